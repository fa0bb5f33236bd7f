"""What several commands share: the --precision flag and the model argument turned into an Embedder."""
from __future__ import annotations

import argparse
from typing import Any


def add_precision(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16", "int8"],
                   help="auto (default): the image tower in bf16 where the CPU or GPU multiplies bf16 natively, else "
                        "fp32; int8: dynamically quantised image tower (CPU)")


def model_arg(args: argparse.Namespace, **embedder_kw: Any) -> Any:
    """`--model` as given, or an Embedder of it when `--precision` overrides the default."""
    if getattr(args, "precision", None) is None:
        return args.model
    from ..embed import Embedder

    return Embedder(args.model, precision=args.precision, **embedder_kw)

