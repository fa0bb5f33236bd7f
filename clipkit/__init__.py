"""clipkit: train, evaluate and use CLIP-style image-text embeddings.

Names are imported lazily so `import clipkit` (and the CLI's light commands) do not pay for torch.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load": "checkpoint", "save": "checkpoint", "save_hf": "checkpoint",
    "ModelConfig": "config", "PreprocessConfig": "config", "TextConfig": "config", "VisionConfig": "config",
    "get_preset": "config", "list_presets": "config",
    "Embedder": "embed",
    "create_model": "factory", "create_model_and_tokenizer": "factory", "get_tokenizer": "factory",
    "CLIPModel": "model", "ClipOutput": "model",
    "Tokenizer": "tokenizer",
    "Preprocess": "transforms", "load_image": "transforms",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'clipkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
