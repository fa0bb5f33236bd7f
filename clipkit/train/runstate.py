"""Training checkpoints that resume bitwise: model, optimizer, scheduler, RNGs, data position and counters.

The data position is the epoch and batch in it, plus, per rank, its stream position (tar shards: each reader
slot's pass and raw samples taken) and its skip counts, gathered from every rank when a checkpoint is written.

Each checkpoint is a directory `checkpoints/step_XXXXXXXX/` committed atomically (temp dir + rename)
with a sha256 manifest; everything in it loads with `torch.load(weights_only=True)` or safetensors.
There is no gradient scaler to save: mixed precision is bf16 autocast, which needs none.
"""
from __future__ import annotations

import json
import logging
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_model

from ..data.samples import SkipCounter
from ..errors import CheckpointError
from ..fileio import atomic_dir, verify_manifest, write_manifest
from ..formats.weights import load_state, read_safetensors
from .config import TrainingError, config_changes

log = logging.getLogger("clipkit.train")
STEP_DIR = re.compile(r"^step_(\d{8})$")
SaveHook = Callable[[Path, int], None]  # (temp folder of the checkpoint being written, step), before its commit


@dataclass
class Position:
    """Where a run stands and what it counted: saved with every checkpoint, restored on resume."""

    step: int = 0  # optimizer steps taken (checkpoint step_N holds the state after N steps)
    epoch: int = 0
    batch_in_epoch: int = 0
    nonfinite_total: int = 0
    best: Optional[dict[str, Any]] = None  # {"score", "step", "epoch"} of the best validation so far
    data: Optional[list[dict[str, Any]]] = None  # per rank: {"stream": data position, "skips": its counts}


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


def train_state(pos: Position, optimizer: torch.optim.Optimizer, scheduler: Any, skips: SkipCounter,
                config: dict[str, Any], fingerprint: str) -> dict[str, Any]:
    """Everything besides the weights that a bitwise resume needs (the `train_state.pt` of a checkpoint)."""
    return {
        "step": pos.step, "epoch": pos.epoch, "batch_in_epoch": pos.batch_in_epoch,
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "rng": rng_state(), "skips": skips.to_dict(),
        "nonfinite_total": pos.nonfinite_total, "best": json.dumps(pos.best), "data": json.dumps(pos.data),
        "config": json.dumps(config), "fingerprint": fingerprint,
    }


def gather_ranks(local: Any, world: int) -> list[Any]:
    """Every rank's `local` (a JSON-like value), in rank order, on every rank (a collective when world > 1)."""
    if world == 1:
        return [local]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, local)
    return out


def data_state(stream: dict[str, Any], skips: SkipCounter, world: int) -> list[dict[str, Any]]:
    """The data position a checkpoint holds: each rank's stream position and skip counts (a collective)."""
    return gather_ranks({"stream": stream, "skips": skips.to_dict()}, world)


def merged_skips(skips: SkipCounter, world: int) -> SkipCounter:
    """The skip counts of all ranks together (a collective when world > 1)."""
    return SkipCounter.merge(gather_ranks(skips.to_dict(), world))


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def save_checkpoint(root: Path, step: int, model: torch.nn.Module, state: dict[str, Any], keep: int = 3,
                    before_commit: Optional[SaveHook] = None) -> Path:
    """Write `checkpoints/step_N` atomically, then prune all but the newest `keep` step directories (`keep` <= 0
    keeps all; the best model is a model directory outside `checkpoints/`, never pruned)."""
    target = step_dir(root, step)
    with atomic_dir(target) as tmp:
        save_model(model, str(tmp / "model.safetensors"))
        torch.save(state, tmp / "train_state.pt")
        if before_commit is not None:
            before_commit(tmp, step)
        write_manifest(tmp)
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return target


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
    """Verify and load one checkpoint into `model`; returns its train state. A checkpoint without its manifest is
    not committed (or was tampered with) and is refused."""
    if not verify_manifest(path, CheckpointError, complete=True):
        raise CheckpointError(f"{path}: no manifest.json: not a committed checkpoint")
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


def resume(root: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
           config: dict[str, Any], fingerprint: str, ignore_config: bool = False,
           ) -> Optional[tuple[Path, Position, SkipCounter]]:
    """Load the newest good checkpoint into the model, optimizer, scheduler and RNGs; returns its path, position
    and skip counts, or None when there is none. A checkpoint of another config or other data is refused
    (TrainingError) unless `ignore_config`."""
    clean_stale(root)
    found = latest_good(root, model)
    if found is None:
        log.warning("resume: no usable checkpoint in %s; starting from scratch", root)
        return None
    path, state = found
    changed = config_changes(json.loads(state["config"]), config)
    if state["fingerprint"] != fingerprint:
        changed.append("training data (file list, captions, sizes or mtimes) changed")
    if changed and not ignore_config:
        raise TrainingError(f"refusing to resume from {path}: the run changed:\n  " + "\n  ".join(changed)
                            + "\n(resume_ignore_config=True resumes anyway)")
    if changed:
        log.warning("resuming from %s although the run changed: %s", path, "; ".join(changed))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    pos = Position(state["step"], state["epoch"], state["batch_in_epoch"], state["nonfinite_total"],
                   json.loads(state["best"]), json.loads(state.get("data", "null")))
    return path, pos, SkipCounter.from_dict(state["skips"])
