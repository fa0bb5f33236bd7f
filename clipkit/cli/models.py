"""`clipkit demo`, `convert` and `presets`."""
from __future__ import annotations

import argparse

SHAPE_KWARGS = ("patch_size", "embed_dim", "depth")  # what reshapes a CLIP ViT's timm model (ViT-L-14: 14/1024/24)


def _cmd_demo(args: argparse.Namespace) -> int:
    from ..app.demo import MULTILINGUAL, DemoConfig, run_demo

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


def add_demo(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument("--distill-student-tower", metavar="MODEL", help="distil into this transformers text model "
                   "(directory or hf-hub:org/name, e.g. hf-hub:sentence-transformers/"
                   "paraphrase-multilingual-MiniLM-L12-v2) instead of extending the teacher's tokenizer")
    p.add_argument("--quiet", dest="progress", action="store_false", default=None, help="no progress output")
    p.set_defaults(func=_cmd_demo)


def _cmd_convert(args: argparse.Namespace) -> int:
    from ..formats import load, save, save_hf

    model, _, tok = load(args.src, format=args.src_format, arch=args.arch, quick_gelu=args.quick_gelu,
                         trust_torchscript=args.trust_torchscript)
    out = save_hf(model, tok, args.out) if args.to == "hf" else save(model, tok, args.out)
    print(f"wrote {args.to} model to {out}")
    return 0


def add_convert(sub: argparse._SubParsersAction) -> None:
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


def _cmd_presets(args: argparse.Namespace) -> int:
    from ..model.config import get_preset, list_presets

    for name in list_presets():
        cfg = get_preset(name)
        text = cfg.text.pretrained or cfg.text.hf_config.get("model_type")
        shape = "".join(f" {k}={cfg.vision.timm_kwargs[k]}" for k in SHAPE_KWARGS if k in cfg.vision.timm_kwargs)
        print(f"{name:12s} image={cfg.vision.timm_name}{shape} text={text} dim={cfg.embed_dim} "
              f"px={cfg.preprocess.image_size}")
    return 0


def add_presets(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("presets", help="list the named model presets")
    p.set_defaults(func=_cmd_presets)

