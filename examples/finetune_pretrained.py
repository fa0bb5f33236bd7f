"""Fine-tune a pretrained CLIP on a small table with partial locking; zero-shot before, after and WiSE-FT.

    python examples/finetune_pretrained.py --model ViT-B-32 --pretrained laion2b_s34b_b79k \\
        --train my/train.csv --val my/val.csv --reference ref.csv --lock-image-unlocked-groups 2 --epochs 3

Weights come through the Hugging Face cache (HF_HOME; HF_HUB_OFFLINE=1 works once they are there); `--model`
may also be `hf-hub:org/name`. `--reference` is a labelled table (image, caption, label) from the starting
model's domain: its zero-shot accuracy before (alpha 0), after (alpha 1) and for each WiSE-FT mix shows what
fine-tuning costs there, `--val` what it gains on your data. Pick the mix from RUN/wise_ft/alpha_A.
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from clipkit.train import TrainConfig, train


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ViT-B-32", help="model name or hf-hub:org/name")
    p.add_argument("--pretrained", help="open_clip tag, e.g. laion2b_s34b_b79k (not for hf-hub: names)")
    p.add_argument("--train", required=True, help="CSV with image and caption columns")
    p.add_argument("--val", required=True, help="held-out CSV of your domain (a label column adds zero-shot)")
    p.add_argument("--reference", required=True, help="labelled CSV of the starting model's domain")
    p.add_argument("--out", default="runs/finetune", help="run directory")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--max-steps", type=int, help="stop after this many steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-5, help="small: the model is already trained")
    p.add_argument("--lock-image-unlocked-groups", type=int, default=2, help="train only the last N image groups")
    p.add_argument("--lock-text-unlocked-layers", type=int, help="train only the last N text groups")
    p.add_argument("--lr-layer-decay", type=float, default=0.75, help="lower groups learn slower")
    p.add_argument("--wise-ft", type=float, nargs="+", default=[0.25, 0.5, 0.75], help="mixing weights to compare")
    args = p.parse_args(argv)

    cfg = TrainConfig(train_data=args.train, val_data=args.val, reference_data=args.reference, output=args.out,
                      model=args.model, pretrained=args.pretrained, epochs=args.epochs, max_steps=args.max_steps,
                      batch_size=args.batch_size, lr=args.lr, warmup_steps=min(50, args.max_steps or 50),
                      lock_image_unlocked_groups=args.lock_image_unlocked_groups,
                      lock_text_unlocked_layers=args.lock_text_unlocked_layers, lr_layer_decay=args.lr_layer_decay,
                      wise_ft=tuple(args.wise_ft))
    summary = train(cfg)
    print(f"fine-tuned model: {summary['model_dir']} ({summary['steps']} steps)")
    print("reference zero-shot top-1 by mixing weight (0: before fine-tuning, 1: after):")
    for row in summary["wise_ft"]["rows"]:
        ref, val = row["reference"]["top1"], row["val"].get("top1", row["val"]["text_to_image_R@1"])
        print(f"  alpha {row['alpha']:<5g} reference {ref:.3f}  validation {val:.3f}  {row['model']}")
    print(f"table: {summary['wise_ft']['table']}  plot: {summary['wise_ft']['plot']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
