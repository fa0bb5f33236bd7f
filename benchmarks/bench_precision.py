"""What bf16 and int8 cost in quality and buy in speed, on real embeddings of a trained clipkit model.

For each precision the script embeds every image of a `clipkit data emoji` folder (the neighbour database) and
the test split's captions and images, then reports, against fp32: recall@10 of the neighbours (text->image: test
captions as queries; image->image: test images as queries), zero-shot top-1 on the test split, the lowest cosine
between a row and its fp32 row, and tower-only throughput (pre-decoded pixels / pre-tokenised captions), so the
speed is the model's and not the decoder's.

    python benchmarks/bench_precision.py --model /tmp/demo_check/model --data /tmp/demo_check/data
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import pandas as pd
import torch

import clipkit
from clipkit.evaluate.runners import eval_zeroshot
from clipkit.evaluate.zeroshot import DEFAULT_TEMPLATES, load_templates
from clipkit.model.precision import autocast

PRECISIONS = ("fp32", "auto", "bf16", "int8")


def recall_at_10(ref_q: np.ndarray, ref_db: np.ndarray, q: np.ndarray, db: np.ndarray, skip_self: bool) -> float:
    """Mean overlap of the top-10 neighbour sets (fp32 vs this precision), `[Nq, D] x [Ndb, D]`."""
    def top(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        s = a @ b.T  # [Nq, Ndb]
        if skip_self:
            s[s > 1 - 1e-6] = -np.inf  # the query image itself
        return np.argsort(-s, 1)[:, :10]
    return float(np.mean([len(set(x) & set(y)) / 10 for x, y in zip(top(ref_q, ref_db), top(q, db))]))


def tower_speed(e: clipkit.Embedder, pixels: torch.Tensor, tokens, rounds: int) -> tuple[float, float]:
    """Images/s and texts/s of the towers alone (best of `rounds`)."""
    def best(fn) -> float:
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)
    with torch.inference_mode():
        with autocast(e.precision.image, e.device):
            ti = best(lambda: e.encoder.encode_image(pixels))
        with autocast(e.precision.text, e.device):
            tt = best(lambda: e.encoder.encode_text(tokens))
    return len(pixels) / ti, len(tokens["input_ids"]) / tt


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="folder with train/val/test.csv (clipkit data emoji)")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    tables = {s: pd.read_csv(os.path.join(args.data, f"{s}.csv")) for s in ("train", "val", "test")}
    test = tables["test"].assign(image=lambda t: [os.path.join(args.data, x) for x in t["image"]])
    db_paths = [os.path.join(args.data, x) for x in sorted(set(pd.concat(tables.values())["image"]))]
    q_paths = sorted(set(test["image"]))
    captions = test["caption"].tolist()
    tfile = os.path.join(args.data, "templates.txt")
    templates = load_templates(tfile) if os.path.exists(tfile) else DEFAULT_TEMPLATES
    out = {}
    for name in PRECISIONS:
        e = clipkit.Embedder(args.model, precision=name, device="cpu", progress=False)
        db, qt, qi = e.images(db_paths), e.texts(captions), e.images(q_paths)
        top1 = eval_zeroshot(e, test, templates=templates).metrics["top1"]
        pixels = torch.stack([e.preprocess(x) for x in db_paths[:256]])
        speed = tower_speed(e, pixels, e.tokenizer(captions[:256]), args.rounds)
        out[name] = (e.precision, db, qt, qi, top1, speed)
    print(f"# bench_precision: {args.model}, {len(db_paths)} database images, {len(captions)} test captions, "
          f"{len(q_paths)} test images, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| precision | towers (image / text) | recall@10 text->image | recall@10 image->image | zero-shot top-1 | "
          "min cosine to fp32 (images / texts) | image tower img/s | text tower txt/s |")
    print("|---|---|---|---|---|---|---|---|")
    _, f_db, f_qt, f_qi, _, _ = out["fp32"]
    for name, (prec, db, qt, qi, top1, (si, st)) in out.items():
        r_ti = recall_at_10(f_qt, f_db, qt, db, False)
        r_ii = recall_at_10(f_qi, f_db, qi, db, True)
        cos = f"{(db * f_db).sum(1).min():.5f} / {(qt * f_qt).sum(1).min():.5f}"
        print(f"| {name} | {prec.image} / {prec.text} | {r_ti:.4f} | {r_ii:.4f} | {100 * top1:.2f} | {cos} | "
              f"{si:.0f} | {st:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
