"""Fine-tune a CLIP on your own image-caption CSV (columns `image`, `caption`).

    python examples/finetune_csv.py --train my.csv --val val.csv --model tiny-minilm --lock-text --epochs 3

`--model` is a preset (`tiny`, `tiny-minilm`, `ViT-B-32`) or a model directory (clipkit or Hugging Face CLIP).
Image paths in the CSV are relative to the CSV's folder. Run it again with `--resume` after a crash.
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from clipkit import Embedder
from clipkit.data import read_table
from clipkit.evaluate import eval_retrieval
from clipkit.train import TrainConfig, train


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", required=True, help="CSV with image and caption columns")
    p.add_argument("--val", help="held-out CSV for retrieval metrics")
    p.add_argument("--model", default="tiny-minilm", help="preset name or model directory")
    p.add_argument("--out", default="runs/ft", help="run directory; the model lands in OUT/model")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--max-steps", type=int, help="stop after this many steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=32, help="small batches, many steps: best on CPU")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--lock-text", action="store_true", help="freeze the text tower (e.g. pretrained MiniLM)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    args = p.parse_args(argv)

    cfg = TrainConfig(train_data=args.train, val_data=args.val, model=args.model, output=args.out,
                      epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr,
                      warmup_steps=min(50, args.max_steps or 50), lock_text=args.lock_text, resume=args.resume)
    summary = train(cfg)
    print(f"model saved to {summary['model_dir']} after {summary['steps']} steps")
    if summary.get("best"):  # validation runs at the end of each full epoch
        print(f"best validation checkpoint (after step {summary['best']['step']}): {args.out}/best_model")

    if args.val:  # the final model on the validation table, beside what a random ranking scores
        result = eval_retrieval(Embedder(summary["model_dir"], progress=False), read_table(args.val))
        print(result.table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
