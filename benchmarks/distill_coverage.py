"""Where a distilled text tower loses Korean queries: per test emoji, the rank of its image for the plain English
name (teacher space) and for the Korean name, beside the share of the Korean name's words that occur anywhere in
the parallel pairs it was trained on. Prints hits by coverage and the ceiling that coverage allows.

    python benchmarks/distill_coverage.py --data demo/data --model demo/model_multilingual [--out ranks.csv]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from bench_distill import read_splits
from clipkit.embed import Embedder
from clipkit.evaluate.metrics import text_to_image_ranks


def ranks(emb: Embedder, test: pd.DataFrame, parallel: pd.DataFrame) -> pd.DataFrame:
    """One row per test emoji: en, ko, rank_en, rank_ko (1 = its image first, ties against the model) and cov
    (the share of the Korean name's words that some training pair has)."""
    images = test.drop_duplicates("image").reset_index(drop=True)
    vectors = emb.images(images["image"].tolist())
    known = {w for text in parallel["text"] for w in text.split()}
    names = test[test["form"] == "name"].pivot_table(index="emoji", columns="lang", values="caption", aggfunc="first")
    right = [np.flatnonzero(images["emoji"].to_numpy() == e) for e in names.index]
    df = names[["en", "ko"]].reset_index()
    for lang in ("en", "ko"):
        df[f"rank_{lang}"] = text_to_image_ranks(vectors, emb.texts(df[lang].tolist()), right)
    df["cov"] = [float(np.mean([w in known for w in ko.split()])) for ko in df["ko"]]
    return df


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, type=Path, help="the emoji dataset, with the parallel.tsv trained on")
    ap.add_argument("--model", required=True, help="the distilled model")
    ap.add_argument("--parallel", type=Path, help="the pairs it was trained on (default DATA/parallel.tsv)")
    ap.add_argument("--out", type=Path, help="write the per-query ranks here (CSV)")
    args = ap.parse_args()
    parallel = pd.read_csv(args.parallel or args.data / "parallel.tsv", sep="\t", keep_default_na=False)
    df = ranks(Embedder(args.model, progress=False), read_splits(args.data)["test"], parallel)
    if args.out:
        df.to_csv(args.out, index=False)
    hit_en, hit_ko = df["rank_en"] <= 10, df["rank_ko"] <= 10
    print(f"{len(df)} test names; R@10 English {hit_en.mean():.4f}, Korean {hit_ko.mean():.4f}")
    print("| Korean words known | names | English top-10 hits | Korean top-10 hits |\n|---|---|---|---|")
    for label, mask in (("none", df["cov"] == 0), ("some", (df["cov"] > 0) & (df["cov"] < 1)), ("all", df["cov"] == 1)):
        print(f"| {label} | {mask.sum()} | {hit_en[mask].sum()} | {hit_ko[mask].sum()} |")
    ceiling = hit_en[df["cov"] > 0].sum() + hit_ko[df["cov"] == 0].sum()
    print(f"ceiling (every name with a known word found as English finds it): {ceiling} hits, "
          f"R@10 {ceiling / len(df):.4f} = {ceiling / max(hit_en.sum(), 1):.0%} of English")


if __name__ == "__main__":
    main()
