"""TrainConfig: everything a training run needs, and which of its fields a resume may change."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

from ..errors import ClipkitError
from ..evaluate.zeroshot import check_templates


class TrainingError(ClipkitError):
    """Training cannot go on (non-finite losses, too much bad data, a config that differs on resume)."""


@dataclass
class TrainConfig:
    """Everything a run needs; written to `RUN_DIR/train_config.json` and checked on resume."""

    train_data: str  # a pairs table, an image folder, or tar shards (a brace pattern or a folder of *.tar)
    output: str
    val_data: Optional[str] = None
    train_num_samples: Optional[int] = None  # tar shards: samples per epoch (default: the total of sizes.json)
    shuffle_buffer: int = 1000  # tar shards: raw samples each loader worker shuffles among
    allow_pipe: bool = False  # tar shards: accept `pipe:` and remote specs (they run shell commands)
    model: str = "tiny"  # model name (random, or with `pretrained`), hf-hub:org/name, clipkit/HF dir, OpenCLIP file
    pretrained: Optional[str] = None  # weights of a model name: an open_clip tag (laion2b_s34b_b79k) or a file
    arch: Optional[str] = None  # the model name an OpenCLIP file's weights are (open_clip's naming)
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
    lock_image_unlocked_groups: Optional[int] = None  # lock all but the last N layer groups, counted as open_clip does
    lock_image_freeze_bn_stats: bool = False  # BatchNorm layers in locked groups keep their running statistics
    lock_text_unlocked_layers: Optional[int] = None  # lock all but the last N text layer groups (open_clip's counting)
    lock_text_freeze_layer_norm: bool = True  # False: LayerNorms in locked text layers still train
    lr_layer_decay: float = 1.0  # lr of a tower's layer group k below the top: lr * decay**k (1: no decay)
    proj_lr: Optional[float] = None  # lr of the projections and the logit scale/bias (None: lr)
    grad_checkpointing: bool = False
    grad_cache_chunk: Optional[int] = None
    precision: str = "auto"  # auto (bf16 on CUDA and on CPUs with native bf16, else fp32) | fp32 | bf16
    augment: bool = False
    style_augment: bool = False  # data.augment.StyleAugment: background colour, colour jitter, grey, blur, crops
    patch_dropout: float = 0.0  # a ViT image tower sees this fraction of its patches dropped per image (FLIP)
    unmasked_steps: int = 0  # with patch_dropout: the run's last N steps see every patch (FLIP's unmasked tuning)
    cache_images: bool = True
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    num_workers: int = 0
    log_every: int = 10
    max_bad_fraction: float = 0.05
    max_nonfinite: int = 5
    train_tokenizer: bool = True
    val_templates: Optional[tuple[str, ...]] = None  # zero-shot prompts for validation; None: DEFAULT_TEMPLATES
    wise_ft: Optional[tuple[float, ...]] = None  # WiSE-FT mixing weights to evaluate (a single float is one)
    reference_data: Optional[str] = None  # a table of the starting model's domain: WiSE-FT reports on it too
    resume: bool = False
    resume_ignore_config: bool = False
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    # fields that may change between a run and its resume without changing the result
    RESUME_FREE = ("resume", "resume_ignore_config", "progress", "num_workers", "log_every",
                   "checkpoint_every", "keep_checkpoints", "val_data", "output", "extra",
                   "wise_ft", "reference_data")  # WiSE-FT only evaluates after training

    # fields added later, with the value that reproduces what runs before them did (a missing field is that value)
    ADDED_DEFAULTS: ClassVar[dict[str, Any]] = {"patch_dropout": 0.0, "unmasked_steps": 0}

    def __post_init__(self) -> None:
        if not 0.0 <= self.patch_dropout < 1.0:
            raise ClipkitError(f"patch_dropout must be in [0, 1), got {self.patch_dropout}")
        if self.unmasked_steps < 0 or (self.unmasked_steps and not self.patch_dropout):
            raise ClipkitError(f"unmasked_steps ({self.unmasked_steps}) counts the last steps run without patch dropout:"
                               " it needs patch_dropout > 0 and must be >= 0")
        if self.style_augment and not self.cache_images:
            raise ClipkitError("style_augment works on the decoded-image cache: drop --no-image-cache")
        if self.val_templates is not None:  # a bad template fails now, not at the first validation
            self.val_templates = check_templates(self.val_templates)
        self._check_fine_tuning()

    def _check_fine_tuning(self) -> None:
        """Locking, learning-rate and WiSE-FT options fail now, with what is wrong, not after the data is read."""
        for name in ("lock_image_unlocked_groups", "lock_text_unlocked_layers"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ClipkitError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.lr_layer_decay <= 1:
            raise ClipkitError(f"lr_layer_decay must be in (0, 1], got {self.lr_layer_decay}")
        if self.wise_ft is not None:
            alphas = (self.wise_ft,) if isinstance(self.wise_ft, (int, float)) else self.wise_ft
            self.wise_ft = tuple(float(a) for a in alphas)
            if not self.wise_ft or not all(0 <= a <= 1 for a in self.wise_ft):
                raise ClipkitError(f"wise_ft mixing weights must be in [0, 1], got {list(self.wise_ft)}")
            if not (self.val_data or self.reference_data):
                raise ClipkitError("WiSE-FT is judged on val_data (the new domain) and reference_data (the starting "
                                   "model's domain): give at least one")


def config_dict(cfg: TrainConfig, world: int) -> dict[str, Any]:
    """The config as JSON values (tuples become lists, as in `train_config.json`), plus the world size."""
    return json.loads(json.dumps({**dataclasses.asdict(cfg), "world_size": world}))


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`key: old -> new` for every field that differs, except those a resume may change (RESUME_FREE)."""
    keys = sorted((set(old) | set(new)) - set(TrainConfig.RESUME_FREE))
    old = {**TrainConfig.ADDED_DEFAULTS, **old}
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
