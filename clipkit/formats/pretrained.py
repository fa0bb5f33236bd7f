"""open_clip-compatible entry points: a model by name, optionally with pretrained weights by name or file.

`create_model_and_transforms("ViT-B-32", pretrained="laion2b_s34b_b79k")` reads as open_clip's does, and so do
`create_model`, `get_tokenizer` and `list_pretrained`, so code can switch by changing the import. Without
`pretrained` the model is random (`model.factory`: clipkit's presets and open_clip's CLIP ViT names);
`hf-hub:org/name` is its own weights. Pretrained weights come in eval mode, as from `clipkit.load`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..model import factory
from ..model.clip import CLIPModel
from ..model.config import ModelConfig
from ..model.hubfiles import HUB_PREFIX
from ..model.tokenizer import Tokenizer
from ..model.transforms import Preprocess
from . import hub
from .auto import build, read_any
from .hub import list_pretrained
from .weights import StateDict

__all__ = ["create_model", "create_model_and_tokenizer", "create_model_and_transforms", "get_tokenizer",
           "list_pretrained"]
PRETRAINED_OVERRIDES = ("quick_gelu", "resize_mode")  # what may differ from the named weights
Name = Union[str, ModelConfig]
Device = Union[str, torch.device]


def _is_hub(name: Name) -> bool:
    return isinstance(name, str) and name.startswith(HUB_PREFIX)


def read_pretrained(name: str, pretrained: Optional[str], **overrides: Any) -> tuple[ModelConfig, StateDict, Tokenizer]:
    """(config, state dict, tokenizer) of `name` with weights `pretrained`: an open_clip tag, a weights file or
    model directory, or nothing for an `hf-hub:` name. Only `PRETRAINED_OVERRIDES` may be given beside them."""
    extra = sorted(k for k, v in overrides.items() if v is not None and k not in PRETRAINED_OVERRIDES)
    if extra:
        raise ValueError(f"{', '.join(extra)}: would change the model of pretrained weights ({name}, "
                         f"pretrained={pretrained!r}); with pretrained weights only "
                         f"{', '.join(PRETRAINED_OVERRIDES)} apply")
    quick_gelu = overrides.get("quick_gelu")
    if _is_hub(name):
        if pretrained:
            raise ValueError(f"{name}: a hub repository is its own weights; pretrained={pretrained!r} does not apply")
        cfg, state, tok = hub.read(name, quick_gelu)
    elif pretrained is None:
        raise ValueError(f"{name}: no pretrained weights named (pass pretrained=TAG, see clipkit.list_pretrained())")
    elif Path(pretrained).exists():
        cfg, state, tok = read_any(pretrained, arch=name, quick_gelu=quick_gelu)
    else:
        cfg, state, tok = hub.read(f"{name}:{pretrained}", quick_gelu)
    if overrides.get("resize_mode") is not None:
        cfg.preprocess.resize_mode = overrides["resize_mode"]
    return cfg, state, tok


def create_model_and_tokenizer(name: Name, pretrained: Optional[str] = None, *, device: Device = "cpu",
                               **overrides: Any) -> tuple[CLIPModel, Tokenizer]:
    """The model of `name` (random without `pretrained`, see `model.factory.resolve_config` for the overrides)
    and the tokenizer that fits it."""
    if pretrained is None and not _is_hub(name):
        model, tok = factory.create_model_and_tokenizer(name, **overrides)
        return model.to(device), tok
    cfg, state, tok = read_pretrained(str(name), pretrained, **overrides)
    return build(cfg, state).to(device).eval(), tok


def create_model(name: Name, pretrained: Optional[str] = None, *, device: Device = "cpu",
                 **overrides: Any) -> CLIPModel:
    """A model by name: `create_model("ViT-B-32", pretrained="laion2b_s34b_b79k")`, `create_model("tiny")`."""
    return create_model_and_tokenizer(name, pretrained, device=device, **overrides)[0]


def create_model_and_transforms(name: Name, pretrained: Optional[str] = None, *, device: Device = "cpu",
                                **overrides: Any) -> tuple[CLIPModel, Preprocess, Preprocess]:
    """(model, preprocess_train, preprocess_val) as open_clip returns them; the preprocessing (size, mean/std,
    interpolation, resize mode) is the pretrained config's."""
    model = create_model(name, pretrained, device=device, **overrides)
    cfg = model.config.preprocess
    return model, Preprocess(cfg, train=True), Preprocess(cfg)


def get_tokenizer(name: Name, **overrides: Any) -> Tokenizer:
    """The tokenizer of a model name; `tokenizer(texts)` gives ids as open_clip's does (`TokenIds`)."""
    if _is_hub(name):
        return hub.read_tokenizer(str(name))
    return factory.get_tokenizer(name, **overrides)
