"""The `clipkit` command: parses arguments, calls the library, prints. No logic lives here."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .cli_search import add_dedup, add_precision, add_search, add_serve, model_arg
from .errors import ClipkitError

Handler = Callable[[argparse.Namespace], int]


def _cmd_demo(args: argparse.Namespace) -> int:
    from .app.demo import MULTILINGUAL, DemoConfig, run_demo

    fields = set(DemoConfig.__dataclass_fields__)
    options = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    if "styles" in options:
        options["styles"] = tuple(options["styles"])
    if options.get("holdout") == "none":
        options["holdout"] = None
    result = run_demo(DemoConfig(**options))
    print("\n" + result.headline())
    print(f"\ndone in {result.seconds / 60:.1f} min. Open {result.out / 'report.html'} in a browser; metrics in {result.out / 'metrics.json'}.")
    model = result.out / MULTILINGUAL if (result.out / MULTILINGUAL).exists() else result.out / "model"
    print(f"serve the index: clipkit serve --index {result.out / 'index'} --model {model}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from .formats import load, save, save_hf

    model, _, tok = load(args.src, format=args.src_format, arch=args.arch, quick_gelu=args.quick_gelu,
                         trust_torchscript=args.trust_torchscript)
    out = save_hf(model, tok, args.out) if args.to == "hf" else save(model, tok, args.out)
    print(f"wrote {args.to} model to {out}")
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    from .model.config import get_preset, list_presets

    for name in list_presets():
        cfg = get_preset(name)
        text = cfg.text.pretrained or cfg.text.hf_config.get("model_type")
        print(f"{name:12s} image={cfg.vision.timm_name} text={text} dim={cfg.embed_dim} px={cfg.preprocess.image_size}")
    return 0


def _cmd_data_parallel(args: argparse.Namespace) -> int:
    from .data.datasets.parallel import build_parallel
    from .data.tables import read_raw
    from .errors import DataError

    columns = read_raw(Path(args.exclude), "error") if args.exclude else {"emoji": []}
    if "emoji" not in columns:
        raise DataError(f"{args.exclude}: no `emoji` column to exclude by (columns: {', '.join(columns)})")
    exclude = set(columns["emoji"])
    summary = build_parallel(args.out, tuple(args.langs), exclude=exclude)
    print(f"{summary.total} pairs ({', '.join(f'{k}: {n}' for k, n in summary.pairs.items())}) to {summary.path}; "
          f"{summary.excluded_names} emoji left out")
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    from .data.datasets import build_emoji_dataset

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
    from .data.shard_writer import write_shards

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


def _cmd_train(args: argparse.Namespace) -> int:
    from .evaluate.zeroshot import load_templates
    from .train import TrainConfig, train

    if args.val_templates:
        args.val_templates = load_templates(args.val_templates)
    fields = set(TrainConfig.__dataclass_fields__) - {"extra"}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields and v is not None})
    summary = train(cfg)
    if "model_dir" in summary:
        print(f"trained {summary['steps']} steps; model saved to {summary['model_dir']}")
    if "wise_ft" in summary:
        print(f"\nWiSE-FT ({summary['wise_ft']['plot']}):\n" + Path(summary["wise_ft"]["table"]).read_text().rstrip())
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    from .evaluate.runners import score_table

    summary = score_table(model_arg(args), args.pairs, prompt_column=args.prompt_column, image_column=args.image_column,
                          prefix=args.prefix, r_precision_r=args.r_precision, reference_column=args.reference_column,
                          resize_mode=args.resize_mode, json_out=args.json)
    for key, value in summary.items():
        print(f"{key:24s} {value:.4f}" if isinstance(value, float) else f"{key:24s} {value}")
    return 0


def _print_ranking(result: dict) -> None:
    print(f"prompt: {result['prompt']}")
    for rank, item in enumerate(result["ranking"], 1):
        score = f"{item['score']:+.4f}" if item["score"] is not None else "failed"
        print(f"{rank:3d}  {score}  {item['image']}" + (f"  ({item['error']})" if "error" in item else ""))


def _cmd_rerank(args: argparse.Namespace) -> int:
    from .evaluate.runners import rerank_files, rerank_pairs

    options = dict(top=args.top, templates=args.templates, negative_prompt=args.negative_prompt,
                   resize_mode=args.resize_mode, json_out=args.json)
    if args.pairs:
        results = rerank_pairs(model_arg(args), args.pairs, sheet_dir=args.sheet, **options)
    elif args.prompt and args.images:
        results = [rerank_files(model_arg(args), args.prompt, args.images, sheet=args.sheet, **options)]
    else:
        raise ValueError("give --prompt with candidate IMAGES, or --pairs TABLE (prompt, image columns)")
    for result in results:
        _print_ranking(result)
    if args.sheet:
        print(f"contact sheet(s): {args.sheet}")
    if all(item["score"] is None for r in results for item in r["ranking"]):
        print("clipkit rerank: error: no candidate image could be read", file=sys.stderr)
        return 2
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate.runners import run_eval

    if args.kind == "linear-probe" and not args.train:
        raise ValueError("linear-probe needs --train TABLE (the labelled images the probe learns from)")
    result = run_eval(args.kind, model_arg(args), args.data, train=args.train, label_column=args.label_column,
                      templates=args.templates, json_out=args.json, plot=args.plot)
    print(result.table())
    for path in (args.json, args.plot):
        if path:
            print(f"wrote {path}")
    return 0


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
    from .search.collection import embed_collection, shard_from_env

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
    from .search.collection import collection_duplicates, read_collection_info

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
    from .search.collection import build_index_from_collection

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


def _add_embed(sub: argparse._SubParsersAction) -> None:
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


def _add_index(sub: argparse._SubParsersAction) -> None:
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


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="zero-shot, retrieval or linear-probe/few-shot evaluation of a model")
    p.add_argument("kind", choices=["zeroshot", "retrieval", "linear-probe"])
    p.add_argument("--model", required=True, help="clipkit/HF model directory or OpenCLIP file")
    p.add_argument("--data", required=True, help="evaluation table (image, caption[, label]) or folder; zeroshot and "
                   "linear-probe read a folder as class folders (label = sub-folder, captions optional)")
    p.add_argument("--train", help="linear-probe: labelled training table or class folder")
    p.add_argument("--label-column", default="label")
    p.add_argument("--templates", help="file with one prompt template per line, each containing {}")
    p.add_argument("--json", help="write flat metrics here")
    p.add_argument("--plot", help="retrieval: PNG grid of top results; linear-probe: few-shot curve PNG")
    add_precision(p)
    p.set_defaults(func=_cmd_eval)


def _add_data(sub: argparse._SubParsersAction) -> None:
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


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="fine-tune or train a CLIP model on image-caption pairs")
    p.add_argument("--train-data", required=True, help="table (CSV/TSV/parquet/JSONL), folder of image+.txt pairs, "
                   "or tar shards ('shards/shard-{00000..00099}.tar' or a folder of *.tar): streamed, not cached")
    p.add_argument("--train-num-samples", type=int, help="tar shards: samples per epoch (default: their sizes.json)")
    p.add_argument("--shuffle-buffer", type=int, help="tar shards: samples each reader shuffles among (default 1000)")
    p.add_argument("--allow-pipe", action="store_true", default=None,
                   help="tar shards: accept pipe: and remote specs (they run a shell command: trusted specs only)")
    p.add_argument("--val-data", help="validation table (retrieval, and zero-shot if it has a label column)")
    p.add_argument("--model", default="tiny", help="model name (ViT-B-32, tiny, ...; random unless --pretrained, "
                   "*-minilm: packaged weights), hf-hub:org/name, clipkit/HF directory, or OpenCLIP file (default: tiny)")
    p.add_argument("--pretrained", help="weights for a model name: an open_clip tag such as laion2b_s34b_b79k "
                   "(fetched into the Hugging Face cache), or a weights file")
    p.add_argument("--arch", help="the model name an OpenCLIP file's weights are (ViT-B-32 GELU, ViT-B-32-quickgelu)")
    p.add_argument("--text-tower", help="text tower override for a preset: minilm, hf-hub:org/name or hf:/dir")
    p.add_argument("--output", required=True, help="run folder: checkpoints/, model/, metrics.jsonl, loss_curve.png")
    p.add_argument("--image-column", help="image column name (default: image)")
    p.add_argument("--caption-column", help="caption column name (default: caption)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--max-steps", type=int, help="stop after this many steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, help="per-process batch size (default 64)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 5e-4)")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--loss", choices=["clip", "siglip"])
    p.add_argument("--label-smoothing", type=float)
    p.add_argument("--grad-checkpointing", action="store_true", default=None)
    p.add_argument("--grad-cache-chunk", type=int, help="gradient cache: embed the batch in chunks of this many rows")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"],
                   help="auto (default): bf16 autocast on CUDA and on CPUs with native bf16 (AVX-512 BF16, AMX), "
                        "else fp32")
    p.add_argument("--augment", action="store_true", default=None, help="random resized crops while training")
    p.add_argument("--style-augment", action="store_true", default=None,
                   help="style-robust augmentation: random background colour, colour jitter, grey-scale, blur, crops")
    p.add_argument("--patch-dropout", type=float, metavar="RATE",
                   help="ViT image towers: drop this fraction of each image's patches while training (FLIP; 0.5 "
                        "halves the tokens; default 0)")
    p.add_argument("--unmasked-steps", type=int, metavar="N",
                   help="with --patch-dropout: the last N steps see every patch (FLIP's unmasked tuning)")
    p.add_argument("--no-image-cache", dest="cache_images", action="store_false", default=None,
                   help="decode images every epoch instead of once into a uint8 cache")
    p.add_argument("--checkpoint-every", type=int, help="save a checkpoint every N steps (default 200)")
    p.add_argument("--keep-checkpoints", type=int)
    p.add_argument("--workers", dest="num_workers", type=int, help="data loader worker processes")
    p.add_argument("--log-every", type=int)
    p.add_argument("--max-bad-fraction", type=float, help="abort when more than this fraction of images is unreadable")
    p.add_argument("--resume", action="store_true", default=None, help="continue from the newest good checkpoint")
    p.add_argument("--resume-ignore-config", action="store_true", default=None,
                   help="resume even though the config or the training data changed since the checkpoint")
    p.add_argument("--val-templates", help="validation zero-shot: file with one prompt template per line, each "
                   "containing {} (default: the library's templates)")
    p.add_argument("--quiet", dest="progress", action="store_false", default=None, help="no progress bar")
    _add_finetune_flags(p)
    p.set_defaults(func=_cmd_train)


def _add_finetune_flags(p: argparse.ArgumentParser) -> None:
    """Locking (open_clip's flags and layer-group counting), learning rates per layer group, WiSE-FT."""
    p.add_argument("--lock-image", action="store_true", default=None, help="freeze the image tower (not its projection)")
    p.add_argument("--lock-image-unlocked-groups", type=int, metavar="N",
                   help="freeze the image tower but its last N layer groups, counted as open_clip counts them")
    p.add_argument("--lock-image-freeze-bn-stats", action="store_true", default=None,
                   help="BatchNorm layers in frozen groups keep their running statistics")
    p.add_argument("--lock-text", action="store_true", default=None, help="freeze the text tower (its features are computed once)")
    p.add_argument("--lock-text-unlocked-layers", type=int, metavar="N",
                   help="freeze the text tower but its last N layer groups, counted as open_clip counts them")
    p.add_argument("--lock-text-freeze-layer-norm", action=argparse.BooleanOptionalAction, default=None,
                   help="LayerNorms of frozen text layers are frozen too (default: yes)")
    p.add_argument("--lr-layer-decay", type=float, metavar="D",
                   help="layer-wise lr decay: a tower's layer group k below its top trains at lr * D**k (default 1)")
    p.add_argument("--proj-lr", type=float, help="lr of the projections and the logit scale (default: --lr)")
    p.add_argument("--wise-ft", type=float, nargs="+", metavar="ALPHA",
                   help="WiSE-FT sweep: evaluate (1 - ALPHA) * start + ALPHA * fine-tuned for each ALPHA (and 0, 1); "
                   "writes wise_ft.md, wise_ft.png and wise_ft/alpha_ALPHA models")
    p.add_argument("--reference-data", help="WiSE-FT: table from the starting model's domain, evaluated for the trade-off")


def _add_score(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="CLIPScore / RefCLIPScore / R-precision of (prompt, image) pairs")
    p.add_argument("--model", required=True)
    p.add_argument("--pairs", required=True, help="table with prompt and image columns")
    p.add_argument("--prompt-column", default="prompt")
    p.add_argument("--image-column", default="image")
    p.add_argument("--reference-column", help="RefCLIPScore: column of reference captions (JSON list or a|b|c)")
    p.add_argument("--prefix", help='caption prefix; the reference CLIPScore uses "A photo depicts "')
    p.add_argument("--r-precision", type=int, metavar="R", help="also report R-precision with R candidate prompts")
    p.add_argument("--resize-mode", choices=["shortest", "longest", "squash"],
                   help="override preprocessing; longest letterboxes odd sizes and transparent padding")
    p.add_argument("--json", help="write per-pair scores and the summary here")
    add_precision(p)
    p.set_defaults(func=_cmd_score)


def _add_rerank(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rerank", help="rank candidate images for a prompt (best-of-N), or for every prompt of a table")
    p.add_argument("--model", required=True)
    p.add_argument("--prompt", help="the prompt the candidates were generated for")
    p.add_argument("images", nargs="*", help="candidate image files")
    p.add_argument("--pairs", help="batch mode: table of (prompt, image) rows, ranked per prompt")
    p.add_argument("--top", type=int, help="keep the best K")
    p.add_argument("--templates", nargs="+", help='prompt templates with {} (e.g. "{}" "a picture of {}")')
    p.add_argument("--negative-prompt", help="similarity to this prompt is subtracted")
    p.add_argument("--resize-mode", choices=["shortest", "longest", "squash"],
                   help="override preprocessing; longest letterboxes odd sizes and transparent padding")
    p.add_argument("--sheet", help="contact sheet PNG (a folder of sheets with --pairs)")
    p.add_argument("--json", help="write the ranking JSON here")
    add_precision(p)
    p.set_defaults(func=_cmd_rerank)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the main job: emoji data, train, evaluate, index, search, rerank, report")
    p.add_argument("--out", default="demo", help="output folder (default: ./demo)")
    p.add_argument("--seed", type=int)
    p.add_argument("--recipe", choices=["pretrained", "minilm", "scratch"], help="pretrained (default): ImageNet "
                   "EfficientNet-Lite2 + locked MiniLM; minilm: random ViT + locked MiniLM; scratch: both random")
    p.add_argument("--max-steps", type=int, help="training steps (default 800, whatever the number of styles)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--styles", nargs="+", type=str, help="art styles to use (default: every one installed)")
    p.add_argument("--holdout", help="art style never trained on, or 'none' (default fluent)")
    p.add_argument("--packs", help="folder of npm emoji packs (default $CLIPKIT_EMOJI_PACKS or ~/.cache/clipkit/emoji-packs)")
    p.add_argument("--limit", type=int, help="use only the first N emoji (quick runs)")
    p.add_argument("--rerank-prompts", type=int, help="prompts in the best-of-N task (default 100)")
    p.add_argument("--distill-steps", type=int, help="steps distilling a Korean text tower (default 600; 0: none)")
    p.add_argument("--quiet", dest="progress", action="store_false", default=None, help="no progress output")
    p.set_defaults(func=_cmd_demo)


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a Hugging Face CLIP dir or OpenCLIP/OpenAI file to clipkit (or clipkit to HF)")
    p.add_argument("src", help="source: HF CLIP directory, OpenCLIP .pt/.bin/.safetensors file, clipkit directory, "
                   "or pretrained weights by name (hf-hub:org/name, ViT-B-32:laion2b_s34b_b79k)")
    p.add_argument("--from", dest="src_format", choices=["auto", "hf", "open_clip", "clipkit"], default="auto",
                   help="source format (detected from the path when 'auto')")
    p.add_argument("--to", choices=["clipkit", "hf"], default="clipkit", help="target format (default: clipkit)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--arch", default=None, help="the model name an OpenCLIP file's weights are, in open_clip's naming: "
                   "ViT-B-32 (GELU: LAION, DataComp) or ViT-B-32-quickgelu (QuickGELU: OpenAI)")
    p.add_argument("--quick-gelu", dest="quick_gelu", action=argparse.BooleanOptionalAction, default=None,
                   help="the activation of an OpenCLIP file without --arch (OpenAI weights use QuickGELU)")
    p.add_argument("--trust-torchscript", action="store_true", help="allow loading TorchScript archives (executable code)")
    p.set_defaults(func=_cmd_convert)


def _add_presets(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("presets", help="list the named model presets")
    p.set_defaults(func=_cmd_presets)


def _cmd_distill(args: argparse.Namespace) -> int:
    from .train.distill import DistillConfig, distill_text

    fields = set(DistillConfig.__dataclass_fields__)
    s = distill_text(DistillConfig(**{k: v for k, v in vars(args).items() if k in fields and v is not None}))
    student = (f"{s['added_tokens']} tokens added, {s['word_tokens']} started at their English word; --tune {s['tune']}"
               if s["student"] == "extend"
               else f"fresh text tower, byte-level BPE of {s['vocab']} tokens")
    print(f"distilled {s['steps']} steps on {s['train_pairs']} pairs ({student}); "
          f"held-out distance to the teacher {s['held_out_distance_before']:.4f} -> {s['held_out_distance']:.4f}")
    print(f"student model saved to {s['model_dir']}")
    return 0


def _add_distill(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("distill-text", help="teach a model's text tower other languages from parallel text "
                       "(the image tower and every index built with it stay valid)")
    p.add_argument("--model", required=True, help="teacher: a clipkit model directory")
    p.add_argument("--parallel", required=True, help="TSV/CSV with columns en, text (and optional lang)")
    p.add_argument("--out", dest="output", required=True, help="run folder: checkpoints/, model/, summary.json")
    p.add_argument("--steps", type=int, help="optimizer steps (default 600)")
    p.add_argument("--batch-size", type=int, help="pairs per step (default 64)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 1e-3 for --tune tokens, 1e-4 for tower)")
    p.add_argument("--tune", choices=["tokens", "tower"], help="tokens (extend's default): only the added tokens "
                   "train, so English embeds exactly as the teacher's; tower: the whole text tower")
    p.add_argument("--english-fraction", type=float, help="--tune tower: English -> English share of a batch (0.25)")
    p.add_argument("--student", choices=["extend", "bpe"], help="extend (default): the teacher's text tower, its "
                   "tokenizer extended; bpe: a fresh tower with a byte-level BPE trained on both columns")
    p.add_argument("--no-word-tokens", dest="word_tokens", action="store_false", default=None,
                   help="extend: keep single-word pairs' words as characters (default: one token each, at its English)")
    p.add_argument("--student-preset", help="bpe: the preset whose CLIP text transformer shape it takes (default tiny)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], help="training step precision (default auto)")
    p.add_argument("--seed", type=int)
    p.add_argument("--resume", action="store_true", default=None, help="continue from the newest good checkpoint")
    p.add_argument("--quiet", dest="progress", action="store_false", default=None, help="no progress bar")
    p.set_defaults(func=_cmd_distill)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipkit", description="CLIP-style image-text embeddings: train, evaluate, search, score.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_demo, _add_data, _add_train, _add_distill, _add_eval, _add_score, _add_rerank, _add_convert,
                _add_presets, _add_embed, _add_index, add_search, add_dedup, add_serve):
        add(sub)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Plain log lines to whatever `sys.stderr` is when a record comes (tests swap it between calls)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _configure_logging() -> logging.Logger:
    """The library's log lines (the "clipkit" loggers, INFO and up) to stderr as plain messages, set up once."""
    logger = logging.getLogger("clipkit")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    return logger


def _os_message(e: OSError) -> str:
    if e.strerror is None:
        return str(e)
    return f"{e.filename}: {e.strerror}" if e.filename else e.strerror


def _faiss_cause(e: RuntimeError) -> Optional[str]:
    """The cause in a FAISS C++ error ("Error in faiss::... at FILE:LINE: Error: 'COND' failed: CAUSE"), else None."""
    msg = str(e).strip()
    if not (msg.startswith("Error in ") and "faiss" in msg):
        return None
    return msg.rsplit("failed: ", 1)[-1].splitlines()[0]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command; returns the exit code (tests call this directly)."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    args = build_parser().parse_args(argv)
    try:
        with logging_redirect_tqdm(loggers=[_configure_logging()]):  # log lines print above progress bars
            return args.func(args)
    except (ClipkitError, ValueError) as e:
        print(f"clipkit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a missing or unwritable path: one line, not a traceback
        print(f"clipkit {args.command}: error: {_os_message(e)}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if (cause := _faiss_cause(e)) is None:
            raise
        print(f"clipkit {args.command}: error: {cause}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
