"""Best-of-N candidate selection on unseen emoji: how often the reranker picks the prompt's own image.

For each prompt (an English test-split caption) the candidates are its own image, degraded by
augmentation, plus N-1 distractors from the same subcategory. Prints top-1 accuracy beside chance
(1/N) for a trained model and, as a control, a random model of the same shape.

    python benchmarks/bench_rerank.py --model demo/model --data demo/data [--n 8] [--prompts 200]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import clipkit
from clipkit.data import read_table
from clipkit.embed import Embedder
from clipkit.evaluate.scoring import rerank
from clipkit.evaluate.tasks import best_of_n_accuracy, best_of_n_task


def accuracy(embedder: Embedder, sets: list, templates: Optional[list[str]] = None) -> dict:
    rankings = [[r.image for r in rerank(embedder, s.prompt, s.candidates, templates=templates)] for s in sets]
    return best_of_n_accuracy(rankings, sets)


def random_twin(model_dir: Path) -> Embedder:
    """A random-initialised model with the trained model's config and tokenizer (the control)."""
    model, preprocess, tok = clipkit.load(model_dir)
    fresh = clipkit.CLIPModel(model.config)
    return Embedder(fresh, preprocess=preprocess, tokenizer=tok, progress=False)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="trained clipkit model directory (e.g. demo/model)")
    p.add_argument("--data", required=True, help="emoji dataset folder with test.csv (e.g. demo/data)")
    p.add_argument("--n", type=int, default=8, help="candidates per prompt")
    p.add_argument("--prompts", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    test = read_table(Path(args.data) / "test.csv")
    with tempfile.TemporaryDirectory() as tmp:
        sets = best_of_n_task(test[test["lang"] == "en"], tmp, n=args.n, num_prompts=args.prompts, seed=args.seed)
        rows = []
        for name, emb, templates in [
            ("trained", Embedder(args.model, progress=False), None),
            ("trained + templates", Embedder(args.model, progress=False), ["{}", "an emoji of {}", "an icon of {}"]),
            ("random init (control)", random_twin(Path(args.model)), None),
        ]:
            t0 = time.perf_counter()
            res = accuracy(emb, sets, templates)
            rows.append((name, res, time.perf_counter() - t0))
    print(f"best-of-{args.n} on {len(sets)} unseen-emoji prompts (seed {args.seed}); chance = {1 / args.n:.3f}\n")
    print("| model | top-1 | chance | ratio to chance | seconds |")
    print("|---|---|---|---|---|")
    for name, res, secs in rows:
        print(f"| {name} | {res['best_of_n_top1']:.3f} | {res['chance_best_of_n_top1']:.3f} | {res['best_of_n_top1'] / res['chance_best_of_n_top1']:.1f}x | {secs:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
