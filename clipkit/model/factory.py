"""Fresh models from a name plus keyword overrides (timm style), and the tokenizer that fits each.

Names are clipkit's presets and open_clip's CLIP ViT names (`model.config.list_presets()`). Pretrained CLIP
weights by name (`pretrained=...`, `hf-hub:`) are read one layer up, in `clipkit.formats.pretrained`; the
towers here can still start from pretrained weights of their own (a transformers text model, timm weights).
"""
from __future__ import annotations

import copy
from typing import Any, Optional, Union

import timm

from ..errors import ClipkitError
from .clip import CLIPModel
from .config import ModelConfig, PreprocessConfig, get_preset
from .tokenizer import Tokenizer, byte_level_tokenizer, load_tokenizer, openai_clip_tokenizer
from .towers import resolve_pretrained

OPENAI_VOCAB = 49408
_SIZED_TOWERS = ("vit", "deit", "eva", "beit", "swin", "convit", "siglip", "naflex")  # fix img_size at build time


def resolve_config(
    name: Union[str, ModelConfig],
    *,
    text_tower: Optional[str] = None,
    image_tower: Optional[str] = None,
    image_pretrained: Union[bool, str, None] = None,
    image_size: Optional[int] = None,
    embed_dim: Optional[int] = None,
    quick_gelu: Optional[bool] = None,
    context_length: Optional[int] = None,
    pooling: Optional[str] = None,
    resize_mode: Optional[str] = None,
    init_logit_bias: Optional[float] = None,
    **timm_kwargs: Any,
) -> ModelConfig:
    """A preset's config (or a copy of the given config) with the overrides applied; unset (None) options keep
    the preset's value.

    `text_tower` is a pretrained transformers model, `hf-hub:org/name` (fetched through huggingface_hub) or
    `hf:/dir` (a local checkpoint), or `minilm`, or `clip` (fresh CLIP text transformer of the preset's shape).
    `image_tower` is any timm name, random unless `image_pretrained` is True (timm's own pretrained weights,
    through its hub machinery) or a local weights file; `timm/<name>` means `<name>` with timm's pretrained
    weights. Its preprocessing (size, mean/std, interpolation) comes from timm's pretrained config unless
    `image_size` says otherwise. Extra keyword arguments go to `timm.create_model`.
    """
    cfg = get_preset(name) if isinstance(name, str) else copy.deepcopy(name)
    if text_tower is not None and text_tower != "clip":
        cfg.text.pretrained, cfg.text.hf_config = text_tower, {}
        cfg.text.pooling = "mean"
    if image_tower is not None:
        if image_tower.startswith("timm/"):
            image_tower, image_pretrained = image_tower[len("timm/"):], image_pretrained or True
        cfg.vision.timm_name, cfg.vision.timm_kwargs = image_tower, {}
        cfg.preprocess = timm_preprocess(image_tower, cfg.preprocess)
    if image_pretrained is not None:
        cfg.vision.pretrained = image_pretrained
    if image_size is not None:
        cfg.preprocess.image_size = image_size
        if "img_size" in cfg.vision.timm_kwargs or image_tower is None or _takes_img_size(cfg.vision.timm_name):
            cfg.vision.timm_kwargs["img_size"] = image_size
    if quick_gelu is not None:
        act = "quick_gelu" if quick_gelu else "gelu"
        cfg.vision.timm_kwargs["act_layer"] = act
        if cfg.text.hf_config:
            cfg.text.hf_config["hidden_act"] = act
    if context_length is not None:
        cfg.text.context_length = context_length
        if cfg.text.hf_config.get("model_type") == "clip_text_model":
            cfg.text.hf_config["max_position_embeddings"] = context_length
    if pooling is not None:
        cfg.text.pooling = pooling
    if embed_dim is not None:
        cfg.embed_dim = embed_dim
    if resize_mode is not None:
        cfg.preprocess.resize_mode = resize_mode
    if init_logit_bias is not None:
        cfg.init_logit_bias = init_logit_bias
    cfg.vision.timm_kwargs.update(timm_kwargs)
    return cfg


def _takes_img_size(timm_name: str) -> bool:
    """Transformer towers fix their input size at build time (positional embeddings); CNNs do not."""
    return any(k in timm_name for k in _SIZED_TOWERS)


def timm_preprocess(timm_name: str, base: PreprocessConfig) -> PreprocessConfig:
    """`base` with the input size, mean/std and interpolation of the timm model's pretrained config."""
    pretrained = timm.get_pretrained_cfg(timm_name)
    if pretrained is None:
        raise ClipkitError(f"unknown timm model {timm_name!r}; see timm.list_models()")
    out = copy.deepcopy(base)
    out.image_size = int(pretrained.input_size[-1])
    out.mean, out.std = tuple(pretrained.mean), tuple(pretrained.std)
    if pretrained.interpolation in ("bicubic", "bilinear", "nearest"):
        out.interpolation = pretrained.interpolation
    return out


def tokenizer_for(cfg: ModelConfig) -> Tokenizer:
    """The default tokenizer of a config: the pretrained tower's own, OpenAI's BPE for an OpenAI-sized
    vocabulary, else byte-level. A missing OpenAI BPE is an error, never a silent byte-level stand-in."""
    ctx = cfg.text.context_length
    if cfg.text.pretrained:
        return load_tokenizer(resolve_pretrained(cfg.text.pretrained), ctx)
    if cfg.text.hf_config.get("vocab_size") == OPENAI_VOCAB:
        tok = openai_clip_tokenizer(ctx)
        if tok is None:
            raise ClipkitError("this text tower needs OpenAI CLIP's BPE, read from the open_clip_torch package, "
                               "which is not installed: pip install open_clip_torch")
        return tok
    return byte_level_tokenizer(ctx)


def bind_tokenizer(cfg: ModelConfig, tok: Tokenizer) -> ModelConfig:
    """A copy of `cfg` whose text tower agrees with `tok`: the end-of-text id it pools at and, for a CLIP
    text transformer, its bos/eos/pad ids (what an exported model pools at). Checks the vocabulary fits."""
    cfg = copy.deepcopy(cfg)
    cfg.text.eot_token_id = tok.eot_token_id
    hf = cfg.text.hf_config
    if hf.get("model_type") == "clip_text_model":
        if tok.vocab_size > hf["vocab_size"]:
            raise ValueError(f"tokenizer has {tok.vocab_size} tokens but the text tower only {hf['vocab_size']}")
        hf.update(bos_token_id=tok.hf.bos_token_id, eos_token_id=tok.eot_token_id, pad_token_id=tok.pad_token_id)
    return cfg


def create_model_and_tokenizer(name: Union[str, ModelConfig], **overrides: Any) -> tuple[CLIPModel, Tokenizer]:
    """A fresh (random or pretrained-tower) model and the tokenizer that fits it."""
    cfg = resolve_config(name, **overrides)
    tok = tokenizer_for(cfg)
    return CLIPModel(bind_tokenizer(cfg, tok)), tok


def create_model(name: Union[str, ModelConfig], **overrides: Any) -> CLIPModel:
    """A fresh model from a preset name (see `clipkit.list_presets()`) and overrides."""
    return create_model_and_tokenizer(name, **overrides)[0]


def get_tokenizer(name: Union[str, ModelConfig], **overrides: Any) -> Tokenizer:
    """The tokenizer `create_model(name, **overrides)` pairs with."""
    return tokenizer_for(resolve_config(name, **overrides))
