"""Pretrained CLIP weights by name, fetched with huggingface_hub into its cache (`model.hubfiles`).

Two kinds of names resolve here. `MODEL:TAG` (or `pretrained=TAG` beside a model name) looks the pair up in
open_clip's pretrained table (`open_clip.list_pretrained()`), whose entries name a hub repository; the weights
file is `open_clip_model.safetensors`, or `open_clip_pytorch_model.bin` (read by the safe loader) when the
repository has no safetensors, as open_clip downloads them. `hf-hub:org/name` is a transformers `CLIPModel`
repository (config + weights + tokenizer + preprocessor config), or an open_clip one (`open_clip_config.json`).
The result is a `Source`: local files plus what the weights do not record (activation, preprocessing).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..errors import CheckpointError, ClipkitError
from ..model.config import ModelConfig, get_preset, list_presets, openclip_model_config, openclip_names
from ..model.factory import tokenizer_for
from ..model.tokenizer import Tokenizer
from ..model.hubfiles import (HUB_PREFIX, TOKENIZER_FILES, WEIGHTS, hub_file, hub_first, hub_model_dir,
                              split_repo)
from ..model.towers import refuse_remote_code
from . import hf, openclip
from .layout import read_json
from .weights import StateDict

OPENCLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
HF_EXTRA = (*TOKENIZER_FILES, "preprocessor_config.json")
_PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")  # open_clip's names, which clipkit shares


@dataclass
class Source:
    """Where named pretrained weights are on disk, and what their name says that the weights do not."""

    name: str  # as the user wrote it
    path: Path  # an open_clip weights file, or a transformers CLIP directory
    format: str  # "open_clip" | "hf"
    arch: Optional[str] = None  # the open_clip model name the weights are (open_clip tags)
    base: Optional[ModelConfig] = None  # or the model's config (open_clip repositories)
    quick_gelu: Optional[bool] = None  # the activation the weights were trained with, when the name says it
    preprocess: dict[str, Any] = field(default_factory=dict)  # PreprocessConfig fields of the pretrained config


def list_pretrained() -> list[tuple[str, str]]:
    """(model, tag) pairs of open_clip's pretrained table that clipkit builds (its CLIP ViTs)."""
    import open_clip

    names = set(openclip_names())
    return [(m, t) for m, t in open_clip.list_pretrained() if m in names]


def is_pretrained_name(spec: str) -> bool:
    """`hf-hub:org/name`, or `MODEL:TAG` with a model name clipkit knows, that is not an existing path."""
    if spec.startswith(HUB_PREFIX):
        return True
    name, _, tag = spec.partition(":")
    return bool(tag) and name in list_presets() and not Path(spec).exists()


def names_a_model(spec: str) -> bool:
    """A pretrained name, or a bare model name that is not a path (for `load`, an error that names the tags)."""
    return is_pretrained_name(spec) or (spec in list_presets() and not Path(spec).exists())


def resolve(spec: str, weights: bool = True) -> Source:
    """Fetch (or find in the cache) the weights a pretrained name points at; with `weights=False` only what
    describes them (configs, tokenizer files), e.g. for a tokenizer."""
    if spec.startswith(HUB_PREFIX):
        return resolve_repo(spec, weights)
    name, _, tag = spec.partition(":")
    if not tag:
        raise ClipkitError(f"{name} is a model name, not weights: name its pretrained weights as {name}:TAG "
                           f"(tags: {', '.join(t for m, t in list_pretrained() if m == name) or 'none'}), or "
                           f"create a random {name} with clipkit.create_model({name!r})")
    return resolve_tag(name, tag, weights)


def read(spec: str, quick_gelu: Optional[bool] = None) -> tuple[ModelConfig, StateDict, Tokenizer]:
    """(config, clipkit state dict, tokenizer) of named pretrained weights, their preprocessing included.
    `quick_gelu` may only repeat what the name says: other activations would change every embedding."""
    src = resolve(spec)
    if src.format == "hf":
        if quick_gelu is not None:
            raise ValueError(f"{spec}: quick_gelu applies to open_clip weights; a transformers CLIP config "
                             "records its activation")
        return hf.read(src.path)
    if quick_gelu is not None and src.quick_gelu is not None and quick_gelu != src.quick_gelu:
        raise ClipkitError(f"{spec}: these weights were trained with {'QuickGELU' if src.quick_gelu else 'GELU'}; "
                           f"quick_gelu={quick_gelu} would change every embedding")
    cfg, sd, tok = openclip.read(src.path, src.arch, src.quick_gelu if src.quick_gelu is not None else quick_gelu,
                                 base=src.base)
    cfg.preprocess = dataclasses.replace(cfg.preprocess, **src.preprocess)
    return cfg, sd, tok


def read_tokenizer(spec: str) -> Tokenizer:
    """The tokenizer of named pretrained weights, without fetching the weights."""
    src = resolve(spec, weights=False)
    if src.format == "hf":
        return hf.read_tokenizer(src.path, read_json(src.path / "config.json"))
    return tokenizer_for(src.base if src.base is not None else get_preset(src.arch))


def resolve_tag(name: str, tag: str, weights: bool = True) -> Source:
    """open_clip's pretrained `tag` of model `name`, e.g. ("ViT-B-32", "laion2b_s34b_b79k"). The activation the
    tag was trained with wins over the name's: `openai` weights are QuickGELU even under `ViT-B-32`."""
    import open_clip

    if name not in openclip_names():
        raise ClipkitError(f"unknown pretrained model {name!r}; models with pretrained weights: "
                           f"{', '.join(sorted({m for m, _ in list_pretrained()}))} (clipkit.list_pretrained())")
    cfg = open_clip.get_pretrained_cfg(name, tag)
    if not cfg or not cfg.get("hf_hub"):
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise ClipkitError(f"unknown pretrained tag {tag!r} for {name}; available: "
                           f"{', '.join(tags) or 'none'} (clipkit.list_pretrained())")
    repo, filename = os.path.split(cfg["hf_hub"])  # "org/name/" or "org/name/file.bin", as open_clip reads it
    files = OPENCLIP_WEIGHTS if not filename else (str(Path(filename).with_suffix(".safetensors")), filename)
    try:
        path = hub_first(repo, files) if weights else Path(repo)
    except CheckpointError as e:
        raise CheckpointError(f"{name}:{tag}: {e}") from None
    return Source(f"{name}:{tag}", path, "open_clip", arch=name, quick_gelu=bool(cfg.get("quick_gelu", False)),
                  preprocess={k: cfg[k] for k in _PREPROCESS_KEYS if k in cfg})


def resolve_repo(spec: str, weights: bool = True) -> Source:
    """A hub repository: transformers CLIP (config.json with model_type "clip") or open_clip (open_clip_config.json)."""
    repo, revision = split_repo(spec)
    config = hub_file(repo, "config.json", revision, optional=True)
    if config is not None:
        hf_cfg = read_json(config)
        refuse_remote_code(hf_cfg, spec)
        if hf_cfg.get("model_type") == "clip":
            return Source(spec, hub_model_dir(spec, None, WEIGHTS if weights else (), HF_EXTRA), "hf")
    oc_path = hub_file(repo, "open_clip_config.json", revision, optional=True)
    if oc_path is not None:
        return _openclip_repo(spec, repo, revision, oc_path, weights)
    if config is not None:
        raise CheckpointError(f"{spec}: not a CLIP repository (config.json has model_type "
                              f"{hf_cfg.get('model_type')!r}, and there is no open_clip_config.json)")
    from huggingface_hub import is_offline_mode

    if is_offline_mode():
        raise CheckpointError(f"{spec}: not in the Hugging Face cache and offline mode is on (HF_HUB_OFFLINE=1); "
                              f"download it once with network access: hf download {repo}")
    raise CheckpointError(f"{spec}: the repository has neither config.json nor open_clip_config.json")


def _openclip_repo(spec: str, repo: str, revision: Optional[str], oc_path: Path, weights: bool) -> Source:
    oc = read_json(oc_path)
    base = openclip_model_config(oc.get("model_cfg", {}))
    if base is None:
        raise CheckpointError(f"{spec}: its open_clip model is not a CLIP ViT with a CLIP text transformer, "
                              "the towers clipkit reads from open_clip weights")
    pp = oc.get("preprocess_cfg", {})
    preprocess = {k: (tuple(pp[k]) if k in ("mean", "std") else pp[k]) for k in _PREPROCESS_KEYS if k in pp}
    path = hub_first(repo, OPENCLIP_WEIGHTS, revision) if weights else oc_path.parent
    return Source(spec, path, "open_clip", base=base, preprocess=preprocess)
