"""clipkit: train, evaluate and use CLIP-style image-text embeddings.

Names are imported lazily so `import clipkit` (and the CLI's light commands) do not pay for torch.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load": "formats", "save": "formats", "save_hf": "formats",
    "ModelConfig": "model", "PreprocessConfig": "model", "TextConfig": "model", "VisionConfig": "model",
    "get_preset": "model", "list_presets": "model",
    "create_model": "formats", "create_model_and_tokenizer": "formats", "create_model_and_transforms": "formats",
    "get_tokenizer": "formats", "list_pretrained": "formats",
    "CLIPModel": "model", "ClipOutput": "model", "Tokenizer": "model", "TokenIds": "model", "Preprocess": "model",
    "load_image": "model",
    "Embedder": "embed",
    "SearchIndex": "search",
    "TrainConfig": "train",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'clipkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
