"""`clipkit eval`, `score` and `rerank`."""
from __future__ import annotations

import argparse
import sys

from .common import add_precision, model_arg


def _cmd_eval(args: argparse.Namespace) -> int:
    from ..evaluate.runners import run_eval

    if args.kind == "linear-probe" and not args.train:
        raise ValueError("linear-probe needs --train TABLE (the labelled images the probe learns from)")
    result = run_eval(args.kind, model_arg(args), args.data, train=args.train, label_column=args.label_column,
                      templates=args.templates, json_out=args.json, plot=args.plot)
    print(result.table())
    for path in (args.json, args.plot):
        if path:
            print(f"wrote {path}")
    return 0


def add_eval(sub: argparse._SubParsersAction) -> None:
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


def _cmd_score(args: argparse.Namespace) -> int:
    from ..evaluate.runners import score_table

    summary = score_table(model_arg(args), args.pairs, prompt_column=args.prompt_column, image_column=args.image_column,
                          prefix=args.prefix, r_precision_r=args.r_precision, reference_column=args.reference_column,
                          resize_mode=args.resize_mode, json_out=args.json)
    for key, value in summary.items():
        print(f"{key:24s} {value:.4f}" if isinstance(value, float) else f"{key:24s} {value}")
    return 0


def add_score(sub: argparse._SubParsersAction) -> None:
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


def _print_ranking(result: dict) -> None:
    print(f"prompt: {result['prompt']}")
    for rank, item in enumerate(result["ranking"], 1):
        score = f"{item['score']:+.4f}" if item["score"] is not None else "failed"
        print(f"{rank:3d}  {score}  {item['image']}" + (f"  ({item['error']})" if "error" in item else ""))


def _cmd_rerank(args: argparse.Namespace) -> int:
    from ..evaluate.runners import rerank_files, rerank_pairs

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


def add_rerank(sub: argparse._SubParsersAction) -> None:
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

