"""Reading weight files without ever running code from them, and loading them strictly into a model.

Nothing is unpickled beyond tensors: safetensors, or `torch.load(weights_only=True)` with no fallback.
Every failure is a `CheckpointError` that names the file and says what is wrong with it.
"""
from __future__ import annotations

import os
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import CheckpointError, UnsafeCheckpointError

PathLike = Union[str, os.PathLike]
StateDict = dict[str, torch.Tensor]


def read_safetensors(path: PathLike) -> StateDict:
    """All tensors of a safetensors file; a truncated or damaged file raises CheckpointError."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({e})") from None


def read_weights_dir(path: Path, names: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")) -> StateDict:
    """The state dict of a transformers-style directory: the first of `names` it has, whole or sharded
    (`NAME.index.json` beside its shards, as `save_pretrained(max_shard_size=...)` writes them)."""
    from ..model.hubfiles import INDEX_SUFFIX, shard_files

    def read(file: Path) -> StateDict:
        return read_safetensors(file) if file.suffix == ".safetensors" else safe_torch_load(file)

    for name in names:
        if (path / name).is_file():
            return read(path / name)
        if (path / (name + INDEX_SUFFIX)).is_file():
            sd: StateDict = {}
            for shard in shard_files(path / (name + INDEX_SUFFIX)):
                if not (path / shard).is_file():
                    raise CheckpointError(f"{path}: shard {shard} of {name}{INDEX_SUFFIX} is missing")
                sd.update(read(path / shard))
            return sd
    raise CheckpointError(f"{path}: no weights (none of {', '.join(names)}, whole or sharded)")


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
            raise UnsafeCheckpointError(f"{path}: TorchScript archives are executable code; pass trust_torchscript=True "
                                        "(--trust-torchscript) if you trust its source")
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


def load_state(model: torch.nn.Module, sd: StateDict, strict: bool = True) -> float:
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


def check_finite(model: torch.nn.Module) -> None:
    """Refuse to write a model whose weights hold NaN or inf."""
    bad = [n for n, p in model.state_dict().items() if p.is_floating_point() and not torch.isfinite(p).all()]
    if bad:
        raise CheckpointError(f"refusing to save non-finite weights in {len(bad)} tensors, e.g. {bad[:3]}")
