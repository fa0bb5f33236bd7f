"""What the Hugging Face and OpenCLIP converters share: key rename tables and the timm CLIP ViT shape.

clipkit's CLIP-shaped model is a timm CLIP ViT (`visual.*`) plus a transformers CLIPTextModel
(`text.*`), so both foreign layouts map onto it by renaming keys and fusing or splitting q/k/v.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

CLIP_VIT = "vit_base_patch32_clip_224"  # timm entry point: pre-norm ViT with LayerNorm eps 1e-5
RenameTable = list[tuple[str, str]]  # "^" marks a match at the start of a key only


def rename(key: str, table: RenameTable, reverse: bool = False) -> str:
    """Apply a rename table (or its inverse, in reverse order) to one key."""
    for a, b in reversed(table) if reverse else table:
        src, dst = (b, a) if reverse else (a, b)
        anchored = src.startswith("^") or dst.startswith("^")
        src, dst = src.lstrip("^"), dst.lstrip("^")
        if anchored:
            key = dst + key[len(src):] if key.startswith(src) else key
        else:
            key = key.replace(src, dst)
    return key


def vision_kwargs(width: int, layers: int, heads: int, mlp: int, image: int, patch: int, act: str) -> dict[str, Any]:
    """`timm.create_model` keywords of a CLIP ViT of this shape."""
    return {
        "img_size": image, "patch_size": patch, "embed_dim": width, "depth": layers,
        "num_heads": heads, "mlp_ratio": mlp / width, "act_layer": act,
    }


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`; unreadable or non-object JSON raises CheckpointError naming the file."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable JSON ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj

