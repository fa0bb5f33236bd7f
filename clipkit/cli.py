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
    for add in (_add_demo, _add_convert, _add_presets):
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
