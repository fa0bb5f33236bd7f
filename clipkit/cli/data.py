"""`clipkit data emoji|parallel|shards`: build a built-in dataset, parallel text, or tar shards."""
from __future__ import annotations

import argparse
from pathlib import Path


def _cmd_data_parallel(args: argparse.Namespace) -> int:
    from ..data.datasets.parallel import build_parallel
    from ..data.tables import read_raw
    from ..errors import DataError

    columns = read_raw(Path(args.exclude), "error") if args.exclude else {"emoji": []}
    if "emoji" not in columns:
        raise DataError(f"{args.exclude}: no `emoji` column to exclude by (columns: {', '.join(columns)})")
    exclude = set(columns["emoji"])
    summary = build_parallel(args.out, tuple(args.langs), exclude=exclude)
    print(f"{summary.total} pairs ({', '.join(f'{k}: {n}' for k, n in summary.pairs.items())}) to {summary.path}; "
          f"{summary.excluded_names} emoji left out")
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    from ..data.datasets import build_emoji_dataset

    chosen = {k: v for k, v in (("styles", args.styles), ("holdout", args.holdout)) if v is not None}
    if chosen.get("holdout") == "none":
        chosen["holdout"] = None
    summary = build_emoji_dataset(args.out, size=args.size, seed=args.seed, langs=args.langs, packs=args.packs,
                                  progress=not args.quiet, keywords=args.keywords, **chosen)
    for split, n in summary.rows.items():
        print(f"{split:5s} {n:6d} rows, {summary.emoji[split]:5d} emoji")
    for style, n in summary.images.items():
        print(f"style {style}: {n} images from {summary.sources[style]['source']}"
              + (f"; held out: all {summary.holdout_rows} rows in holdout.csv" if style == summary.holdout else ""))
    for style, reason in summary.skipped_styles.items():
        print(f"style {style} skipped: {reason}")
    for note in summary.notes:
        print(f"note: {note}")
    print(f"wrote {summary.total_rows + summary.holdout_rows} captioned rows to {summary.out} in {summary.seconds:.1f}s")
    return 0


def _cmd_data_shards(args: argparse.Namespace) -> int:
    from ..data.shard_writer import write_shards

    s = write_shards(args.source, args.out, shard_size=args.shard_size, image_column=args.image_column,
                     caption_column=args.caption_column, progress=not args.quiet)
    print(f"wrote {s.samples} samples in {len(s.shards)} shard(s) ({s.bytes / 1e6:.1f} MB) to {s.out} "
          f"in {s.seconds:.1f}s; counts in {s.out / 'sizes.json'}")
    for reason, n in s.skipped.items():
        print(f"skipped {n} row(s): {reason} (first: {', '.join(s.examples[:3])})")
    if s.dropped_rows:
        print(f"{s.dropped_rows} table row(s) dropped while reading (empty captions or bad lines)")
    print(f"train from them: clipkit train --train-data '{s.spec}' ...")
    return 0


def add_data(sub: argparse._SubParsersAction) -> None:
    kinds = sub.add_parser("data", help="build a built-in dataset (no download), or write a table as tar shards")
    which = kinds.add_subparsers(dest="name", required=True, metavar="KIND")
    s = which.add_parser("shards", help="write a pairs table or image folder as WebDataset tar shards + sizes.json")
    s.add_argument("source", help="table (CSV/TSV/parquet/JSONL) or folder of image+.txt pairs")
    s.add_argument("--out", required=True, help="new (or empty) folder for shard-00000.tar, ... and sizes.json")
    s.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    s.add_argument("--image-column", default="image")
    s.add_argument("--caption-column", default="caption")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_cmd_data_shards)
    t = which.add_parser("parallel", help="write emoji names as (English, other language) pairs for distill-text")
    t.add_argument("--out", required=True, help="TSV to write (columns en, text, lang, kind, emoji)")
    t.add_argument("--langs", nargs="+", default=["ko"], help="languages beside English (default: ko)")
    t.add_argument("--exclude", help="a table whose `emoji` column names emoji to leave out (e.g. emoji/test.csv)")
    t.set_defaults(func=_cmd_data_parallel)
    p = which.add_parser("emoji", help="build the emoji dataset (train/val/test CSVs + images)")
    p.add_argument("--out", required=True, help="output folder (train/val/test/holdout CSVs + images)")
    p.add_argument("--size", type=int, default=64, help="image size in pixels (default 64)")
    p.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    p.add_argument("--styles", nargs="+", help="art styles to draw, each skipped with a reason when not installed "
                   "(default: openmoji noto facebook joypixels fluent)")
    p.add_argument("--holdout", help="art style written to holdout.csv instead of train/val/test, or 'none' "
                   "(default: fluent)")
    p.add_argument("--packs", help="folder of npm emoji packs (default $CLIPKIT_EMOJI_PACKS or ~/.cache/clipkit/emoji-packs)")
    p.add_argument("--langs", nargs="+", default=["en", "ko"], help="caption languages")
    p.add_argument("--keywords", action="store_true", help="also caption each image by its CLDR keywords (form "
                   "'keywords', from the emojibase-data pack; measured worse to train on, see benchmarks/RESULTS.md)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_data)

