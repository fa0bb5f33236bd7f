"""Embed a folder (or CSV) of images, build a FAISS search index, save it, reload it and query it by text.

    python examples/search_index.py --model my-model --images photos/ --out photos-index --query "a red apple" -k 5

A folder is read with `read_folder` (captions optional), a CSV with `read_table` (`image` paths relative
to the CSV, and `caption`); every column (`image`, `image_rel`, `caption`, ...) is kept as index
metadata and comes back with each hit.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from clipkit import Embedder
from clipkit.data import read_folder, read_table
from clipkit.search import SearchIndex


def list_images(source: str) -> pd.DataFrame:
    """Every image under a folder (recursive, captioned or not), or every row of a table."""
    return read_folder(source, keep_uncaptioned=True) if Path(source).is_dir() else read_table(source)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="clipkit, Hugging Face CLIP or OpenCLIP model")
    p.add_argument("--images", required=True, help="folder of images, or a CSV with an image column")
    p.add_argument("--out", default="index", help="where the index directory is saved")
    p.add_argument("--query", default="a red apple")
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--kind", default="auto", help="auto, flat, hnsw, ivfpq or a FAISS factory string")
    args = p.parse_args(argv)

    embedder = Embedder(args.model)
    table = list_images(args.images)
    vectors = embedder.images(table["image"].tolist(), on_error="nan")  # [N, D]; unreadable rows are NaN
    ok = ~np.isnan(vectors).any(axis=1)
    if not ok.all():
        print(f"skipped {int((~ok).sum())} unreadable images")
    index = SearchIndex.build(vectors[ok], table[ok], kind=args.kind)
    index.save(args.out)
    print(f"indexed {len(index)} images as {index.factory!r} in {args.out}")

    index = SearchIndex.load(args.out, expected_dim=embedder.dim)  # what a later process would do
    scores, ids = index.search(embedder.texts([args.query]), k=args.k)  # [1, k] each
    print(f"top {args.k} for {args.query!r}:")
    for hit in index.results(scores, ids)[0]:
        print(f"  {hit['score']:+.4f}  {hit['image']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
