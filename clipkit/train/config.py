"""TrainConfig: everything a training run needs, and which of its fields a resume may change."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Optional

from ..errors import ClipkitError
from ..evaluate.zeroshot import check_templates


class TrainingError(ClipkitError):
    """Training cannot go on (non-finite losses, too much bad data, a config that differs on resume)."""


@dataclass
class TrainConfig:
    """Everything a run needs; written to `RUN_DIR/train_config.json` and checked on resume."""

    train_data: str
    output: str
    val_data: Optional[str] = None
    model: str = "tiny"  # preset name, clipkit/HF dir, or OpenCLIP file (with arch)
    arch: Optional[str] = None
    text_tower: Optional[str] = None  # override for presets, e.g. "minilm" or "hf:/dir"
    image_column: str = "image"
    caption_column: str = "caption"
    epochs: int = 1
    max_steps: Optional[int] = None
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.1
    warmup_steps: int = 50
    grad_clip: float = 1.0
    seed: int = 0
    loss: str = "clip"  # clip | siglip
    label_smoothing: float = 0.0
    lock_image: bool = False
    lock_text: bool = False
    grad_checkpointing: bool = False
    grad_cache_chunk: Optional[int] = None
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    augment: bool = False
    cache_images: bool = True
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    num_workers: int = 0
    log_every: int = 10
    max_bad_fraction: float = 0.05
    max_nonfinite: int = 5
    train_tokenizer: bool = True
    val_templates: Optional[tuple[str, ...]] = None  # zero-shot prompts for validation; None: DEFAULT_TEMPLATES
    wise_ft: Optional[float] = None
    reference_data: Optional[str] = None  # a table of the starting model's domain: WiSE-FT reports on it too
    resume: bool = False
    resume_ignore_config: bool = False
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    # fields that may change between a run and its resume without changing the result
    RESUME_FREE = ("resume", "resume_ignore_config", "progress", "num_workers", "log_every",
                   "checkpoint_every", "keep_checkpoints", "val_data", "output", "extra")

    def __post_init__(self) -> None:
        if self.val_templates is not None:  # a bad template fails now, not at the first validation
            self.val_templates = check_templates(self.val_templates)


def config_dict(cfg: TrainConfig, world: int) -> dict[str, Any]:
    """The config as JSON values (tuples become lists, as in `train_config.json`), plus the world size."""
    return json.loads(json.dumps({**dataclasses.asdict(cfg), "world_size": world}))


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`key: old -> new` for every field that differs, except those a resume may change (RESUME_FREE)."""
    keys = sorted((set(old) | set(new)) - set(TrainConfig.RESUME_FREE))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
