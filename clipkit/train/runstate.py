"""Training checkpoints that resume bitwise: model, optimizer, scheduler, scaler, RNGs, data position.

Each checkpoint is a directory `checkpoints/step_XXXXXXXX/` committed atomically (temp dir + rename)
with a sha256 manifest; everything in it loads with `torch.load(weights_only=True)` or safetensors.
"""
from __future__ import annotations

import logging
import os
import random
import re
import shutil
import signal
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors.torch import save_model

from ..formats.weights import load_state, read_safetensors
from ..errors import CheckpointError
from ..fileio import atomic_dir, verify_manifest, write_manifest

log = logging.getLogger("clipkit.train")
STEP_DIR = re.compile(r"^step_(\d{8})$")
CRASH_AT_STEP = "CLIPKIT_TEST_CRASH_AT_STEP"  # test hooks: SIGKILL ourselves after a step / inside a save
CRASH_IN_SAVE = "CLIPKIT_TEST_CRASH_IN_SAVE"


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as tensors and lists (weights_only-loadable)."""
    py = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def save_checkpoint(root: Path, step: int, model: torch.nn.Module, state: dict[str, Any], keep: int = 3) -> Path:
    """Write `checkpoints/step_N` atomically; prune all but the newest `keep` (and `best`)."""
    target = step_dir(root, step)
    with atomic_dir(target) as tmp:
        save_model(model, str(tmp / "model.safetensors"))
        torch.save(state, tmp / "train_state.pt")
        if os.environ.get(CRASH_IN_SAVE) == str(step):
            _crash_mid_write(tmp / "train_state.pt")
        write_manifest(tmp)
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return target


def _crash_mid_write(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    os.kill(os.getpid(), signal.SIGKILL)


def maybe_crash_after(step: int) -> None:
    if os.environ.get(CRASH_AT_STEP) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


def list_checkpoints(root: Path) -> list[Path]:
    """Committed step directories, oldest first (temp dirs of interrupted saves are ignored)."""
    if not root.exists():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name))


def clean_stale(root: Path) -> None:
    """Remove temp directories left behind by saves that were killed mid-write."""
    if root.exists():
        for p in root.iterdir():
            if p.name.startswith(".") and p.name.endswith(".tmp"):
                shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(path: Path, model: torch.nn.Module) -> dict[str, Any]:
    """Verify and load one checkpoint into `model`; returns its train state."""
    verify_manifest(path, CheckpointError)
    load_state(model, read_safetensors(path / "model.safetensors"))
    try:
        return torch.load(path / "train_state.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means this checkpoint is unusable
        raise CheckpointError(f"{path}: unreadable train state ({type(e).__name__}: {e})") from None


def latest_good(root: Path, model: torch.nn.Module) -> Optional[tuple[Path, dict[str, Any]]]:
    """Load the newest checkpoint that verifies, warning about (and skipping) damaged ones."""
    for path in reversed(list_checkpoints(root)):
        try:
            return path, load_checkpoint(path, model)
        except CheckpointError as e:
            log.warning("skipping unreadable/unchecked checkpoint %s: %s", path.name, e)
    return None
