"""The `clipkit` command: parses arguments, calls the library, prints. No logic lives here."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Optional, Sequence

from .errors import ClipkitError

Handler = Callable[[argparse.Namespace], int]


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_smoke

    result = run_smoke(args.out, seed=args.seed)
    print(result.table())
    print(f"\nmodel saved to {result.model_dir}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from .checkpoint import load, save, save_hf

    model, _, tok = load(args.src, arch=args.arch, quick_gelu=args.quick_gelu, trust_torchscript=args.trust_torchscript)
    out = save_hf(model, tok, args.out) if args.to == "hf" else save(model, tok, args.out)
    print(f"wrote {args.to} model to {out}")
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    from .config import get_preset, list_presets

    for name in list_presets():
        cfg = get_preset(name)
        text = cfg.text.pretrained or cfg.text.hf_config.get("model_type")
        print(f"{name:12s} image={cfg.vision.timm_name} text={text} dim={cfg.embed_dim} px={cfg.preprocess.image_size}")
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    from .datasets import build_emoji_dataset

    summary = build_emoji_dataset(args.out, size=args.size, seed=args.seed, styles=args.styles, langs=args.langs,
                                  progress=not args.quiet)
    for split, n in summary.rows.items():
        print(f"{split:5s} {n:6d} rows, {summary.emoji[split]:5d} emoji")
    for style, reason in summary.skipped_styles.items():
        print(f"style {style} skipped: {reason}")
    print(f"wrote {summary.total_rows} captioned rows to {summary.out} in {summary.seconds:.1f}s")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, train

    fields = {f for f in TrainConfig.__dataclass_fields__ if f not in ("extra", "RESUME_FREE")}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields and v is not None})
    summary = train(cfg)
    if "model_dir" in summary:
        print(f"trained {summary['steps']} steps; model saved to {summary['model_dir']}")
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    from .scoring import score_table

    summary = score_table(args.model, args.pairs, prompt_col=args.prompt_column, image_col=args.image_column,
                          prefix=args.prefix, r_precision=args.r_precision, json_out=args.json)
    for key, value in summary.items():
        print(f"{key:24s} {value:.4f}" if isinstance(value, float) else f"{key:24s} {value}")
    return 0


def _cmd_rerank(args: argparse.Namespace) -> int:
    from .scoring import rerank_files

    result = rerank_files(args.model, args.prompt, args.images, top=args.top, templates=args.templates,
                          negative_prompt=args.negative_prompt, sheet=args.sheet, json_out=args.json)
    for rank, item in enumerate(result["ranking"], 1):
        score = f"{item['score']:+.4f}" if item["score"] is not None else "failed"
        print(f"{rank:3d}  {score}  {item['image']}" + (f"  ({item['error']})" if "error" in item else ""))
    if args.sheet:
        print(f"contact sheet: {args.sheet}")
    if all(item["score"] is None for item in result["ranking"]):
        print("clipkit rerank: error: no candidate image could be read", file=sys.stderr)
        return 2
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import run_eval

    result = run_eval(args.kind, args.model, args.data, train=args.train, label_column=args.label_column,
                      templates=args.templates, json_out=args.json, plot=args.plot)
    print(result.table())
    for path in (args.json, args.plot):
        if path:
            print(f"wrote {path}")
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="zero-shot, retrieval or linear-probe/few-shot evaluation of a model")
    p.add_argument("kind", choices=["zeroshot", "retrieval", "linear-probe"])
    p.add_argument("--model", required=True, help="clipkit/HF model directory or OpenCLIP file")
    p.add_argument("--data", required=True, help="evaluation table (image, caption[, label])")
    p.add_argument("--train", help="linear-probe: labelled training table")
    p.add_argument("--label-column", default="label")
    p.add_argument("--templates", help="file with one prompt template per line, each containing {}")
    p.add_argument("--json", help="write flat metrics here")
    p.add_argument("--plot", help="retrieval: PNG grid of top results; linear-probe: few-shot curve PNG")
    p.set_defaults(func=_cmd_eval)


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="build a built-in dataset (no download)")
    p.add_argument("name", choices=["emoji"], help="dataset to build")
    p.add_argument("--out", required=True, help="output folder (train/val/test CSVs + images)")
    p.add_argument("--size", type=int, default=64, help="image size in pixels (default 64)")
    p.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    p.add_argument("--styles", nargs="+", default=["openmoji", "noto"], help="art styles (fonts) to render")
    p.add_argument("--langs", nargs="+", default=["en", "ko"], help="caption languages")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_data)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="fine-tune or train a CLIP model on image-caption pairs")
    p.add_argument("--train-data", required=True, help="table (CSV/TSV/parquet/JSONL) or folder of image+.txt pairs")
    p.add_argument("--val-data", help="validation table (retrieval, and zero-shot if it has a label column)")
    p.add_argument("--model", default="tiny", help="preset name, clipkit/HF directory, or OpenCLIP file (default: tiny)")
    p.add_argument("--arch", help="preset for an OpenCLIP file's activation/preprocessing")
    p.add_argument("--text-tower", help="text tower override for a preset: minilm or hf:/dir")
    p.add_argument("--output", required=True, help="run folder: checkpoints/, model/, metrics.jsonl, loss_curve.png")
    p.add_argument("--image-column", dest="image_col", help="image column name (default: image)")
    p.add_argument("--caption-column", dest="caption_col", help="caption column name (default: caption)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--max-steps", type=int, help="stop after this many steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, help="per-process batch size (default 64)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 5e-4)")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--loss", choices=["clip", "siglip"])
    p.add_argument("--label-smoothing", type=float)
    p.add_argument("--lock-image", action="store_true", default=None, help="freeze the image tower")
    p.add_argument("--lock-text", action="store_true", default=None, help="freeze the text tower (its features are computed once)")
    p.add_argument("--grad-checkpointing", action="store_true", default=None)
    p.add_argument("--grad-cache-chunk", type=int, help="gradient cache: embed the batch in chunks of this many rows")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"])
    p.add_argument("--augment", action="store_true", default=None, help="random resized crops while training")
    p.add_argument("--no-image-cache", dest="cache_images", action="store_false", default=None,
                   help="decode images every epoch instead of once into a uint8 cache")
    p.add_argument("--checkpoint-every", type=int, help="save a checkpoint every N steps (default 200)")
    p.add_argument("--keep-checkpoints", type=int)
    p.add_argument("--workers", dest="num_workers", type=int, help="data loader worker processes")
    p.add_argument("--log-every", type=int)
    p.add_argument("--max-bad-fraction", type=float, help="abort when more than this fraction of images is unreadable")
    p.add_argument("--wise-ft", type=float, help="WiSE-FT: mix initial and fine-tuned weights with this coefficient")
    p.add_argument("--resume", action="store_true", default=None, help="continue from the newest good checkpoint")
    p.add_argument("--resume-ignore-config", action="store_true", default=None)
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    p.set_defaults(func=_cmd_train)


def _add_score(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="CLIPScore / R-precision of (prompt, image) pairs")
    p.add_argument("--model", required=True)
    p.add_argument("--pairs", required=True, help="table with prompt and image columns")
    p.add_argument("--prompt-column", default="prompt")
    p.add_argument("--image-column", default="image")
    p.add_argument("--prefix", help='caption prefix; the reference CLIPScore uses "A photo depicts "')
    p.add_argument("--r-precision", type=int, metavar="R", help="also report R-precision with R candidate prompts")
    p.add_argument("--json", help="write per-pair scores and the summary here")
    p.set_defaults(func=_cmd_score)


def _add_rerank(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rerank", help="rank candidate images for a prompt (best-of-N)")
    p.add_argument("--model", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("images", nargs="+", help="candidate image files")
    p.add_argument("--top", type=int, help="keep the best K")
    p.add_argument("--templates", nargs="+", help='prompt templates with {} (e.g. "{}" "a picture of {}")')
    p.add_argument("--negative-prompt", help="similarity to this prompt is subtracted")
    p.add_argument("--sheet", help="write a contact sheet PNG of the ranking here")
    p.add_argument("--json", help="write the ranking JSON here")
    p.set_defaults(func=_cmd_rerank)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the built-in demo end to end on generated data")
    p.add_argument("--out", default="demo", help="output folder (default: ./demo)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a Hugging Face CLIP dir or OpenCLIP/OpenAI file to clipkit (or clipkit to HF)")
    p.add_argument("src", help="source: HF CLIP directory, OpenCLIP .pt/.bin/.safetensors file, or clipkit directory")
    p.add_argument("--from", dest="src_format", choices=["auto", "hf", "open_clip", "clipkit"], default="auto",
                   help="source format (detected from the path when 'auto')")
    p.add_argument("--to", choices=["clipkit", "hf"], default="clipkit", help="target format (default: clipkit)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--arch", default=None, help="preset whose activation/preprocessing an OpenCLIP file uses (e.g. ViT-B-32)")
    p.add_argument("--quick-gelu", dest="quick_gelu", action=argparse.BooleanOptionalAction, default=None,
                   help="override the activation of an OpenCLIP file (OpenAI weights use QuickGELU)")
    p.add_argument("--trust-torchscript", action="store_true", help="allow loading TorchScript archives (executable code)")
    p.set_defaults(func=_cmd_convert)


def _add_presets(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("presets", help="list the named model presets")
    p.set_defaults(func=_cmd_presets)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipkit", description="CLIP-style image-text embeddings: train, evaluate, search, score.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_demo, _add_data, _add_train, _add_eval, _add_score, _add_rerank, _add_convert, _add_presets):
        add(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command; returns the exit code (tests call this directly)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ClipkitError, FileNotFoundError, ValueError) as e:
        print(f"clipkit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
