"""`load`: any supported model format -> `(model, preprocess, tokenizer)`.

Each format module turns a path into `(ModelConfig, state dict, tokenizer)`; this module picks the
format from the path and builds the model in one place.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch

from ..errors import CheckpointError
from ..fileio import recover_dir
from ..model.clip import CLIPModel
from ..model.config import ModelConfig
from ..model.tokenizer import Tokenizer
from ..model.transforms import Preprocess
from . import hf, hub, native, openclip
from .layout import read_json
from .weights import PathLike, StateDict, load_state

FORMATS = ("auto", "clipkit", "hf", "open_clip")


def detect_format(path: Path) -> str:
    """"clipkit" or "hf" for a model directory (from its config.json), "open_clip" for a weights file."""
    recover_dir(path)  # a save killed mid-swap may have left the directory under its `.NAME.old-*` name
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if not path.is_dir():
        return "open_clip"
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{path}: no config.json (not a clipkit or Hugging Face CLIP model directory)")
    cfg = read_json(cfg_path)
    if native.is_native(cfg):
        return "clipkit"
    if hf.is_hf_clip(cfg):
        return "hf"
    raise CheckpointError(f"{cfg_path}: neither a clipkit model nor a Hugging Face CLIP model "
                          f"(model_type={cfg.get('model_type')!r})")


def read_any(path: PathLike, *, format: str = "auto", arch: Optional[str] = None, quick_gelu: Optional[bool] = None,
             trust_torchscript: bool = False, verify: bool = True) -> tuple[ModelConfig, StateDict, Tokenizer]:
    """(config, clipkit state dict, tokenizer) of a model in any supported format, or of pretrained weights by
    name (`hf-hub:org/name`, `MODEL:TAG` from open_clip's table; fetched into the Hugging Face cache).
    `verify=False` loads a clipkit directory without its manifest (a hand-made one)."""
    if isinstance(path, str) and hub.names_a_model(path):
        if arch is not None:
            raise ValueError(f"{path}: a pretrained name says which model it is; arch applies to weight files")
        return hub.read(path, quick_gelu)
    path = Path(path)
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    found = detect_format(path)
    if format != "auto" and format != found:
        raise CheckpointError(f"{path}: looks like a {found} model, not {format}")
    if found == "clipkit":
        return native.read(path, verify)
    if found == "hf":
        return hf.read(path)
    return openclip.read(path, arch, quick_gelu, trust_torchscript)


def build(cfg: ModelConfig, state: StateDict) -> CLIPModel:
    """The model of `cfg` holding exactly the weights in `state` (strict: any mismatch raises). `cfg` comes from
    a file, so it may ask timm for an architecture only (`native.check_file_config`)."""
    native.check_file_config(cfg, "model config")
    try:
        model = CLIPModel(cfg)
    except (TypeError, ValueError, KeyError, RuntimeError, AssertionError) as e:
        raise CheckpointError(f"cannot build the model its config describes ({type(e).__name__}: {e})") from None
    load_state(model, state)
    return model


def load(path: PathLike, *, format: str = "auto", arch: Optional[str] = None, quick_gelu: Optional[bool] = None,
         device: Union[str, torch.device] = "cpu",
         trust_torchscript: bool = False, verify: bool = True) -> tuple[CLIPModel, Preprocess, Tokenizer]:
    """Load `(model, preprocess, tokenizer)` from a clipkit dir, a Hugging Face CLIP dir, an OpenCLIP file, or
    pretrained weights by name: `hf-hub:org/name` or `MODEL:TAG` (e.g. `ViT-B-32:laion2b_s34b_b79k`).

    For OpenCLIP/OpenAI files, `arch` names the model the weights are, in open_clip's naming (`ViT-B-32` GELU,
    `ViT-B-32-quickgelu` QuickGELU), for the activation and preprocessing a state dict does not record;
    `quick_gelu` overrides the activation. A clipkit directory must match its manifest; `verify=False` loads
    one without (made by hand).
    """
    cfg, state, tok = read_any(path, format=format, arch=arch, quick_gelu=quick_gelu,
                               trust_torchscript=trust_torchscript, verify=verify)
    model = build(cfg, state).to(device).eval()
    return model, Preprocess(model.config.preprocess), tok
