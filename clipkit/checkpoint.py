"""The clipkit model directory (config.json + model.safetensors + tokenizer + manifest) and `load` of any format.

`load` accepts a clipkit directory, a Hugging Face CLIP directory, or an OpenCLIP/OpenAI ViT state
dict file. Nothing is ever unpickled beyond tensors: safetensors, or `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import json
import os
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_model

from . import convert
from .config import ModelConfig
from .errors import CheckpointError, UnsafeCheckpointError
from .factory import tokenizer_for
from .fileio import atomic_dir, verify_manifest, write_json_atomic, write_manifest
from .model import CLIPModel
from .tokenizer import Tokenizer, load_tokenizer
from .transforms import Preprocess

FORMAT, FORMAT_VERSION = "clipkit", 1
WEIGHTS = "model.safetensors"
PathLike = Union[str, os.PathLike]


def save(model: CLIPModel, tokenizer: Tokenizer, directory: PathLike) -> Path:
    """Write a self-describing model directory atomically (a crash leaves the old one intact)."""
    directory = Path(directory)
    _check_finite(model)
    with atomic_dir(directory) as tmp:
        save_model(model, str(tmp / WEIGHTS))
        tokenizer.save(tmp)
        write_json_atomic(tmp / "config.json", {"format": FORMAT, "format_version": FORMAT_VERSION, **model.config.to_dict()})
        write_manifest(tmp)
    return directory


def _check_finite(model: torch.nn.Module) -> None:
    bad = [n for n, p in model.state_dict().items() if p.is_floating_point() and not torch.isfinite(p).all()]
    if bad:
        raise CheckpointError(f"refusing to save non-finite weights in {len(bad)} tensors, e.g. {bad[:3]}")


def load(
    path: PathLike,
    *,
    arch: Optional[str] = None,
    quick_gelu: Optional[bool] = None,
    device: Union[str, torch.device] = "cpu",
    trust_torchscript: bool = False,
) -> tuple[CLIPModel, Preprocess, Tokenizer]:
    """Load `(model, preprocess, tokenizer)` from a clipkit dir, a Hugging Face CLIP dir, or an OpenCLIP file.

    For OpenCLIP/OpenAI files, `arch` names the preset whose activation and preprocessing apply
    (shapes are read from the weights); `quick_gelu` overrides the activation.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_dir():
        kind = _dir_kind(path)
        model, tok = _load_native(path) if kind == FORMAT else _load_hf(path)
    else:
        model, tok = _load_openclip(path, arch, quick_gelu, trust_torchscript)
    model = model.to(device).eval()
    return model, Preprocess(model.config.preprocess), tok


def _dir_kind(path: Path) -> str:
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{path}: no config.json (not a clipkit or Hugging Face CLIP model directory)")
    cfg = _read_json(cfg_path)
    if cfg.get("format") == FORMAT:
        return FORMAT
    if cfg.get("model_type") == "clip":
        return "hf"
    raise CheckpointError(f"{cfg_path}: neither a clipkit model nor a Hugging Face CLIP model (model_type={cfg.get('model_type')!r})")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable JSON ({e})") from None


def _load_native(path: Path) -> tuple[CLIPModel, Tokenizer]:
    verify_manifest(path, CheckpointError)
    cfg_dict = _read_json(path / "config.json")
    if cfg_dict.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: written by a newer clipkit (format {cfg_dict['format_version']}); upgrade clipkit")
    try:
        cfg = ModelConfig.from_dict(cfg_dict)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path / 'config.json'}: invalid clipkit model config ({e})") from None
    cfg.text.pretrained = None  # weights come from model.safetensors, never from the original directory
    model = CLIPModel(cfg)
    load_state(model, read_safetensors(path / WEIGHTS))
    return model, load_tokenizer(path, cfg.text.context_length)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({e})") from None


def load_state(model: torch.nn.Module, sd: dict[str, torch.Tensor], strict: bool = True) -> float:
    """Load weights, listing missing/unexpected keys and shape mismatches; returns the fraction loaded."""
    own = model.state_dict()
    shape = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in sd.items() if k in own and v.shape != own[k].shape]
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if strict and (shape or missing or unexpected):
        raise CheckpointError(
            "weights do not match the model: "
            f"{len(missing)} missing {missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}, "
            f"{len(shape)} shape mismatches {shape[:5]}"
        )
    ok = {k: v for k, v in sd.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict(ok, strict=False)
    return len(ok) / max(len(own), 1)


def _load_hf(path: Path) -> tuple[CLIPModel, Tokenizer]:
    hf_cfg = _read_json(path / "config.json")
    if "auto_map" in hf_cfg:
        raise UnsafeCheckpointError(f"{path}: config.json asks for remote code (auto_map); clipkit never runs it")
    weights = path / WEIGHTS
    sd = read_safetensors(weights) if weights.exists() else safe_torch_load(path / "pytorch_model.bin")
    tok = None
    if any((path / f).exists() for f in ("tokenizer.json", "vocab.json")):
        tok = load_tokenizer(path, hf_cfg["text_config"].get("max_position_embeddings", 77))
    eot = tok.eot_token_id if tok is not None else None
    cfg = convert.config_from_hf(hf_cfg, eot)
    model = CLIPModel(cfg)
    load_state(model, convert.state_from_hf(sd))
    return model, tok if tok is not None else tokenizer_for(cfg)


def _load_openclip(path: Path, arch: Optional[str], quick_gelu: Optional[bool], trust_torchscript: bool) -> tuple[CLIPModel, Tokenizer]:
    obj = read_safetensors(path) if path.suffix == ".safetensors" else safe_torch_load(path, trust_torchscript)
    sd = convert.unwrap_state_dict(obj)
    cfg = convert.config_from_openclip(sd, arch, quick_gelu)
    tok = tokenizer_for(cfg)
    cfg.text.eot_token_id = tok.eot_token_id
    model = CLIPModel(cfg)
    load_state(model, convert.state_from_openclip(sd, model.visual))
    return model, tok


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.split("/", 1)[-1].startswith(("code/", "constants.pkl")) for n in z.namelist())
    except zipfile.BadZipFile:
        return False


def safe_torch_load(path: PathLike, trust_torchscript: bool = False) -> Any:
    """`torch.load(weights_only=True)` with clear errors; never falls back to full unpickling."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: truncated or corrupt (empty file)")
    if _is_torchscript(path):
        if not trust_torchscript:
            raise UnsafeCheckpointError(f"{path}: TorchScript archives are executable code; pass trust_torchscript=True (--trust-torchscript) if you trust its source")
        warnings.warn(f"{path}: loading a TorchScript archive (trust_torchscript=True); only its weights are kept")
        return torch.jit.load(str(path), map_location="cpu").state_dict()
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            if z.testzip() is not None:
                raise CheckpointError(f"{path}: checksum mismatch inside the archive (file corrupt)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - classified below; never retried unsafely
        # zip checkpoints list every global; the legacy (non-zip) format names the first one in the error
        unsafe = _unsafe_globals(path) or re.findall(r"GLOBAL ([\w.]+)", str(e))[:1]
        if unsafe:
            raise UnsafeCheckpointError(
                f"{path}: unsafe checkpoint: contains globals [{', '.join(unsafe)}]; clipkit loads tensors only. "
                "Re-save it as a plain state dict of tensors (or safetensors) in a trusted environment."
            ) from None
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({type(e).__name__}: {_load_error_detail(e)})") from None


def _load_error_detail(e: Exception) -> str:
    """The cause of a failed load, without torch's advice to retry with `weights_only=False`."""
    msg = str(e)
    if "WeightsUnpickler error:" in msg:
        msg = msg.split("WeightsUnpickler error:", 1)[1].strip().split("\n", 1)[0]
    return msg[:200]


def _unsafe_globals(path: Path) -> list[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # noqa: BLE001 - an unreadable file has no globals to report
        return []


def save_hf(model: CLIPModel, tokenizer: Tokenizer, directory: PathLike) -> Path:
    """Export a CLIP-shaped clipkit model as a `transformers.CLIPModel` directory (loads with from_pretrained)."""
    from transformers import CLIPConfig, CLIPImageProcessor
    from transformers import CLIPModel as HFCLIPModel

    hf = HFCLIPModel(CLIPConfig(**convert.hf_config_from(model.config)))
    load_state(hf, {k: v.detach().cpu() for k, v in convert.state_to_hf(model.state_dict()).items()})
    pre = model.config.preprocess
    size = pre.image_size
    processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                   image_mean=list(pre.mean), image_std=list(pre.std))
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        hf.save_pretrained(str(tmp))
        tokenizer.save(tmp)
        processor.save_pretrained(str(tmp))
    return directory
