"""What the Hugging Face and OpenCLIP converters share: key rename tables and reading JSON files.

clipkit's CLIP-shaped model is a timm CLIP ViT (`visual.*`, `model.config.CLIP_VIT`) plus a transformers
CLIPTextModel (`text.*`), so both foreign layouts map onto it by renaming keys and fusing or splitting q/k/v.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

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


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`; unreadable or non-object JSON raises CheckpointError naming the file."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable JSON ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj

