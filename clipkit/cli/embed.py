"""`clipkit embed` and `clipkit index build`: a collection's embeddings and its FAISS index."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ClipkitError
from .common import add_precision, model_arg


def _shard(text: str) -> tuple[int, int]:
    """argparse type for `--shard i/n`."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected i/n such as 0/4, got {text!r}") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"need 0 <= i < n, got {text!r}")
    return i, n


def _bytes(text: str) -> int:
    """argparse type for sizes: 2GB, 512MB, 1.5G, 1000000 (bytes; powers of 1024)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    num = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = num[-1] if num and num[-1] in units else ""
    try:
        value = float(num[: len(num) - len(unit)]) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size such as 2GB or 512MB, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return int(value)


def _cmd_embed(args: argparse.Namespace) -> int:
    from ..search.collection import embed_collection, shard_from_env

    shard = args.shard or shard_from_env()
    model = model_arg(args, batch_size=args.batch_size, progress=False)
    s = embed_collection(model, args.images, args.out, shard=shard, shard_size=args.shard_size,
                         batch_size=args.batch_size, num_workers=args.workers, dtype=args.dtype,
                         captions=not args.no_captions, progress=not args.quiet)
    print(f"shard {shard[0]}/{shard[1]}: wrote {len(s.written)} chunk(s), {len(s.skipped)} already done "
          f"({s.chunks} in the collection of {s.count}); {s.embedded} images in {s.seconds:.1f}s "
          f"({s.images_per_second:.1f} images/s)")
    if s.dropped_rows:
        print(f"{s.dropped_rows} table row(s) dropped while reading (empty captions or bad lines)")
    if s.failures:
        print(f"{len(s.failures)} unreadable image(s) kept as ok=False rows (not indexed):")
        for f in s.failures[:20]:
            print(f"  id {f['id']}  {f['reason']}  {f['image']}")
    print(f"embeddings in {s.out_dir}")
    if args.dedup is not None:
        _embed_dedup(args)
    return 0


def _embed_dedup(args: argparse.Namespace) -> None:
    from ..search.collection import collection_duplicates, read_collection_info

    try:
        read_collection_info(args.out)
    except ClipkitError as e:  # other shards still running: the last one to finish writes the table
        print(f"dedup: not yet, the collection is unfinished ({str(e).split(': ', 1)[-1]})")
        return
    groups = collection_duplicates(args.out, args.dedup)
    extra = int((~groups["keep"]).sum()) if len(groups) else 0
    print(f"dedup: {extra} near-duplicate image(s) beyond the first of {groups['group'].nunique()} group(s) "
          f"at cosine >= {args.dedup}; table in {Path(args.out) / 'duplicates.csv'} "
          f"(leave them out with `clipkit index build --dedup {args.dedup}`)")


def _cmd_index(args: argparse.Namespace) -> int:
    from ..search.collection import build_index_from_collection

    index = build_index_from_collection(args.embeddings, args.out, args.kind, args.memory_budget,
                                        on_disk=args.on_disk, progress=not args.quiet, dedup=args.dedup)
    r = index.build_report
    recall = "n/a" if r.get("recall@10") is None else f"{r['recall@10']:.4f}"
    for key, value in (("factory", r["factory"]), ("count", f"{r['count']} ({r.get('failed', 0)} failed, not indexed)"),
                       ("bytes/vector", r["bytes_per_vector"]), ("build time", f"{r['build_seconds']:.2f}s"),
                       ("recall@10", recall), ("on disk", bool(r.get("on_disk")))):
        print(f"{key:13s} {value}")
    if "recall@10_rerank10" in r:
        print(f"{'recall@10 rerank 10':13s} {r['recall@10_rerank10']:.4f}")
    if "dedup" in r:
        print(f"{'dedup':13s} {r['dedup']['removed']} near-duplicate(s) left out, {r['dedup']['groups']} group(s) "
              f"at cosine >= {r['dedup']['threshold']}")
    print(f"index saved to {args.out}")
    return 0


def add_embed(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embed", help="embed a folder or table of images into resumable chunks for search")
    p.add_argument("--model", required=True, help="clipkit/HF model directory or OpenCLIP file")
    p.add_argument("--images", required=True, help="folder of images (captions optional) or table (CSV/TSV/parquet/JSONL)")
    p.add_argument("--out", required=True, help="embeddings folder (chunks + collection.json); a rerun resumes")
    p.add_argument("--shard", type=_shard, help="embed chunks c with c %% n == i (default: torchrun RANK/WORLD_SIZE, else 0/1)")
    p.add_argument("--shard-size", type=int, default=10_000, help="rows per chunk file (default 10000)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="image decoding worker processes (default 2)")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="stored precision (default float16)")
    p.add_argument("--no-captions", action="store_true", help="do not embed captions")
    p.add_argument("--dedup", type=float, nargs="?", const=0.95, metavar="COSINE",
                   help="once the collection is complete, list near-duplicate images in EMB/duplicates.csv "
                        "(default cosine 0.95)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_precision(p)
    p.set_defaults(func=_cmd_embed)


def add_index(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("index", help="build a search index from embeddings")
    isub = p.add_subparsers(dest="index_command", required=True, metavar="ACTION")
    b = isub.add_parser("build", help="build a FAISS index (+ metadata) from an embeddings folder")
    b.add_argument("--embeddings", required=True, help="folder written by `clipkit embed`")
    b.add_argument("--out", required=True, help="index folder to write (replaced atomically)")
    b.add_argument("--kind", default="auto", help="auto, flat, hnsw, ivf, ivfpq, or a FAISS factory string (default auto)")
    b.add_argument("--memory-budget", type=_bytes, help="RAM the index may use, e.g. 2GB (auto picks a layout that fits)")
    b.add_argument("--on-disk", action="store_true", help="IVF with on-disk inverted lists, merged chunk by chunk "
                   "(collections larger than memory)")
    b.add_argument("--dedup", type=float, nargs="?", const=0.95, metavar="COSINE",
                   help="leave out near-duplicate images but the first of each group (default cosine 0.95)")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=_cmd_index)

