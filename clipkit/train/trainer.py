"""Trainer: contrastive fine-tuning with exact resume, global negatives under torchrun, gradient cache.

`Trainer(TrainConfig(...)).fit()` is what `clipkit train` runs. One process or many (torchrun sets
RANK/WORLD_SIZE; gloo on CPU, nccl on CUDA); only rank 0 writes files. Progress lines go to the
"clipkit.train" logger.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Optional

import pandas as pd
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from ..data.samples import SkipCounter
from ..fileio import write_json_atomic
from ..formats.native import save as save_model_dir
from ..model.clip import CLIPModel
from ..model.groups import image_groups, text_groups, with_prefix
from ..model.precision import training_autocast, training_precision
from . import runstate
from .config import TrainConfig, TrainingError, config_dict
from .losses import create_loss, grad_cache_step
from .runlog import RunLog
from .runstate import Position, SaveHook
from .setup import (build_data, build_model, init_distributed, open_source, read_run_table, set_patch_dropout,
                    source_captions)
from .validation import evaluate_model, validation_score, wise_ft_sweep

log = logging.getLogger("clipkit.train")
NO_DECAY = ("embedding", "cls_token", "pos_embed")  # token/position tables; biases, norms and scales are 1-D
StepHook = Callable[[int], None]  # called with the step number after each step (and its checkpoint, if any)

__all__ = ["StepHook", "TrainConfig", "Trainer", "TrainingError", "cosine_with_warmup", "param_groups", "train"]


def param_groups(model: CLIPModel, weight_decay: float, lr: float, layer_decay: float = 1.0,
                 proj_lr: Optional[float] = None) -> list[dict[str, Any]]:
    """AdamW groups. No weight decay on biases, norms, embeddings, tokens and the logit scale/bias. Layer-wise lr
    decay: a tower's layer group k below its top (`clipkit.model.groups`) trains at `lr * layer_decay**k`; the
    projections and the logit scale/bias at `proj_lr` (default `lr`). Frozen parameters are left out."""
    below_top: dict[str, int] = {}
    for groups in (with_prefix(image_groups(model.visual), "visual."), with_prefix(text_groups(model.text), "text.")):
        for i, group in enumerate(groups):
            below_top.update({name: len(groups) - 1 - i for name in group})
    buckets: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        rate = lr * layer_decay ** below_top[name] if name in below_top else (lr if proj_lr is None else proj_lr)
        decay = 0.0 if p.ndim < 2 or any(k in name for k in NO_DECAY) else weight_decay
        buckets.setdefault((rate, decay), []).append(p)
    order = sorted(buckets, key=lambda key: (-key[0], -key[1]))  # the top lr first, decayed before not decayed
    return [{"params": buckets[key], "lr": key[0], "weight_decay": key[1]} for key in order]


def cosine_with_warmup(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the base lr over `warmup` steps, then cosine decay to 0 at `total`."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(warmup, 1)
        progress = (step - warmup) / max(total - warmup, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class _Meter:
    """The progress bar, and the losses and samples since the last log line (for its mean loss and rate)."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self.bar = tqdm(total=total, initial=initial, desc="train", disable=not enabled)
        self.losses: list[float] = []
        self.seen, self.t0 = 0, time.perf_counter()

    def add(self, loss: Optional[float], samples: int) -> None:
        self.bar.update(1)
        self.seen += samples
        if loss is not None:
            self.losses.append(loss)

    def take(self, world: int) -> tuple[Optional[float], float]:
        """Mean loss (None if every step was skipped) and samples/s over all ranks since the last call."""
        loss = sum(self.losses) / len(self.losses) if self.losses else None
        rate = self.seen * world / max(time.perf_counter() - self.t0, 1e-9)
        self.losses, self.seen, self.t0 = [], 0, time.perf_counter()
        return loss, rate


class Trainer:
    """Owns the model, data, optimizer and checkpoints of one run; `fit()` trains to the end.

    `on_step(step)` runs after every step and `on_save(temp_dir, step)` inside every checkpoint write, before it
    is committed: observation points (tests kill the process there to prove that a resume is exact).
    """

    def __init__(self, cfg: TrainConfig, *, on_step: Optional[StepHook] = None,
                 on_save: Optional[SaveHook] = None) -> None:
        self.cfg, self.on_step, self.on_save = cfg, on_step, on_save
        self.rank, self.world, self.device = init_distributed()
        self.out = Path(cfg.output)
        self.ckpt_root = self.out / "checkpoints"
        torch.manual_seed(cfg.seed)
        source = open_source(cfg)  # a pairs table, or tar shards that stream
        self.val_table = read_run_table(cfg.val_data, cfg) if cfg.val_data else None
        model, self.tokenizer = build_model(cfg, source_captions(source), self.out, self.rank)
        self.model = model.to(self.device).train()
        self._val_text: dict[str, torch.Tensor] = {}  # a locked text tower's pooled features, kept across validations
        self.initial_state = ({k: v.detach().clone() for k, v in self.model.state_dict().items()}
                              if cfg.wise_ft is not None else None)
        self.skips = SkipCounter()
        self.data = build_data(cfg, source, self.model, self.tokenizer, self.skips, self.out, self.rank, self.world)
        self.counts_skips_per_batch = self.data.counts_skips_per_batch  # the decoded cache counts them up front
        self.total_steps = cfg.max_steps or cfg.epochs * self.data.batches_per_epoch
        self._build_optimizer()
        self.loss_fn = create_loss(cfg.loss, **({"label_smoothing": cfg.label_smoothing} if cfg.loss == "clip" else {}))
        self.ddp = self._wrap_ddp()
        self.pos, self.nonfinite_run = Position(), 0
        self.last_val: dict[str, Any] = {"step": None}
        self.config = config_dict(cfg, self.world)
        self.runlog = RunLog(self.out / "metrics.jsonl")
        if cfg.resume:
            self._resume()  # before writing anything: a refused resume leaves the run as it was
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.out / "train_config.json", self.config)
            dropped = self.runlog.keep_until(self.pos.step)  # records after the checkpoint: those steps run again
            if dropped:
                log.info("dropped %d records after step %d from %s", dropped, self.pos.step, self.runlog.path)

    def _build_optimizer(self) -> None:
        cfg = self.cfg
        warmup = min(cfg.warmup_steps, self.total_steps // 2)
        if warmup < cfg.warmup_steps:
            log.warning("warmup_steps %d is over half of the %d steps: using %d", cfg.warmup_steps, self.total_steps, warmup)
        groups = param_groups(self.model, cfg.weight_decay, cfg.lr, cfg.lr_layer_decay, cfg.proj_lr)
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98),
                                           eps=1e-6, fused=True)  # one kernel for all tensors (CPU and CUDA)
        self.scheduler = cosine_with_warmup(self.optimizer, warmup, self.total_steps)

    def _wrap_ddp(self) -> nn.Module:
        if self.world == 1:
            return self.model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(self.model, device_ids=ids)

    def _show_progress(self) -> bool:
        return self.cfg.progress and self.rank == 0

    # ---- loop ----------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train to `total_steps`, validating after each epoch; returns the final summary."""
        meter = _Meter(self.total_steps, self.pos.step, self._show_progress())
        done = self.pos.step >= self.total_steps
        while not done:
            done = self._run_epoch(meter)
        meter.bar.close()
        self.data.close()
        return self._finish()

    def _run_epoch(self, meter: _Meter) -> bool:
        """Train from the current position to the end of its epoch and validate there; True once the run has
        taken `total_steps` steps (then it stops where it is, mid-epoch or not)."""
        for batch in self.data.batches(self.pos.epoch, self.pos.batch_in_epoch):
            self._step(batch, meter)
            if self.pos.step >= self.total_steps:
                return True
        self.pos.epoch, self.pos.batch_in_epoch = self.pos.epoch + 1, 0
        self._validate()
        return False

    def _step(self, batch: dict[str, Any], meter: _Meter) -> None:
        """One optimizer step, then the log line, checkpoint and `on_step` that fall due after it."""
        cfg, pos = self.cfg, self.pos
        if cfg.patch_dropout:  # FLIP's unmasked tuning: the last `unmasked_steps` steps see every patch
            unmasked = pos.step >= self.total_steps - cfg.unmasked_steps
            set_patch_dropout(self.model, 0.0 if unmasked else cfg.patch_dropout)
        loss = self._train_step(batch)
        pos.step, pos.batch_in_epoch = pos.step + 1, pos.batch_in_epoch + 1
        meter.add(loss, len(batch["index"]))
        if pos.step % cfg.log_every == 0 or pos.step == self.total_steps:
            self._log_train(*meter.take(self.world), meter.bar)
        if pos.step % cfg.checkpoint_every == 0 and pos.step < self.total_steps:
            self._save()
        if self.on_step is not None:
            self.on_step(pos.step)

    def _autocast(self) -> Any:
        return training_autocast(training_precision(self.cfg.precision, self.device), self.device)  # auto: the hardware's pick

    def _train_step(self, batch: dict[str, Any]) -> Optional[float]:
        if self.counts_skips_per_batch:
            self.skips.update(batch)
            self.skips.check(self.cfg.max_bad_fraction)
        if len(batch["index"]) * self.world < 2:  # every rank's batch has the same size: all return or none
            return None
        pixels = batch["pixels"].to(self.device, non_blocking=True)
        tokens = {k: batch[k].to(self.device) for k in ("input_ids", "attention_mask") if k in batch}
        text_cache = self.data.text_cache
        pooled = text_cache[batch["index"]].to(self.device) if text_cache is not None else None
        with self._autocast():
            if self.cfg.grad_cache_chunk:
                loss = self._grad_cache_step(pixels, tokens, pooled)
            else:
                out = self.ddp(pixels, tokens, text_pooled=pooled)
                loss = self.loss_fn(out.image_features, out.text_features, out.logit_scale, out.logit_bias)
                if torch.isfinite(loss):
                    loss.backward()
        if not torch.isfinite(loss):
            return self._nonfinite(batch)
        self.nonfinite_run = 0
        if self.cfg.grad_clip:
            nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.grad is not None], self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def _grad_cache_step(self, pixels: torch.Tensor, tokens: dict[str, torch.Tensor], pooled: Optional[torch.Tensor]) -> torch.Tensor:
        m = self.model
        encode_text = m.encode_text_pooled if pooled is not None else m.encode_text
        scale, bias = m.scales()
        loss = grad_cache_step(m.encode_image, encode_text, pixels, pooled if pooled is not None else tokens,
                               self.loss_fn, scale, bias, chunk_size=self.cfg.grad_cache_chunk)
        if self.world > 1:  # the cache bypasses DDP's hooks: average gradients ourselves
            for p in m.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= self.world
        return loss

    def _nonfinite(self, batch: dict[str, Any]) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.pos.nonfinite_total += 1
        self.nonfinite_run += 1
        step = self.pos.step + 1  # 1-based, like checkpoint names (step N = after N steps)
        log.warning("non-finite loss at step %d: step skipped (%d in a row)", step, self.nonfinite_run)
        if self.nonfinite_run >= self.cfg.max_nonfinite:
            good = runstate.list_checkpoints(self.ckpt_root)
            raise TrainingError(
                f"non-finite loss at step {step}, {self.nonfinite_run} steps in a row "
                f"(batch ids {batch['index'][:8].tolist()}); lower the lr or check the data. "
                f"Last good checkpoint: {good[-1] if good else 'none'}"
            )
        return None

    def _log_train(self, loss: Optional[float], rate: float, bar: tqdm) -> None:
        if self.rank != 0:
            return
        rec = {"step": self.pos.step, "epoch": self.pos.epoch, "lr": self.scheduler.get_last_lr()[0], "loss": loss,
               "samples_per_s": round(rate, 2), "logit_scale": float(self.model.scales()[0].detach()),
               "skipped": self.skips.skipped, "nonfinite": self.pos.nonfinite_total}
        bar.set_postfix(loss=f"{loss:.4f}" if loss is not None else "nan", lr=f"{rec['lr']:.2e}", sps=f"{rate:.0f}")
        self._append_metrics(rec)

    def _append_metrics(self, rec: dict[str, Any]) -> None:
        self.runlog.append(rec)

    # ---- checkpoints ---------------------------------------------------------------------------
    def _save(self) -> None:
        self.pos.data = runstate.data_state(self.data.position(), self.skips, self.world)  # every rank's
        if self.rank == 0:
            state = runstate.train_state(self.pos, self.optimizer, self.scheduler, self.skips, self.config,
                                         self.data.fingerprint)
            path = runstate.save_checkpoint(self.ckpt_root, self.pos.step, self.model, state,
                                            self.cfg.keep_checkpoints, before_commit=self.on_save)
            log.info("saved step %d to %s", self.pos.step, path)
        if self.world > 1:
            dist.barrier()

    def _resume(self) -> None:
        found = runstate.resume(self.ckpt_root, self.model, self.optimizer, self.scheduler, self.config,
                                self.data.fingerprint, ignore_config=self.cfg.resume_ignore_config)
        if found is not None:
            path, self.pos, self.skips = found
            mine = self.pos.data[self.rank] if self.pos.data else None  # this rank's stream position and skips
            if mine is not None:
                self.skips = SkipCounter.from_dict(mine["skips"])
            self.data.restore(mine["stream"] if mine else None, self.cfg.resume_ignore_config)
            if self.rank == 0:
                log.info("resumed from step %d (%s)", self.pos.step, path)

    # ---- validation and the end -----------------------------------------------------------------
    def evaluate(self, model: Optional[CLIPModel] = None, table: Optional[pd.DataFrame] = None) -> dict[str, Any]:
        """Retrieval (and zero-shot with `val_templates` when the table has labels) on the validation table."""
        table = self.val_table if table is None else table
        if table is None:
            return {}
        model = model if model is not None else self.model
        cache = self._val_text if model is self.model and "text" in model.locked else None
        return evaluate_model(model, self.tokenizer, self.device, table, self.cfg.val_templates, cache)

    def _validate(self) -> None:
        if self.rank != 0 or self.val_table is None:
            return
        pos, metrics = self.pos, self.evaluate()
        self.last_val = {"step": pos.step, "epoch": pos.epoch, **metrics}
        score = validation_score(metrics)
        self._append_metrics({"step": pos.step, "epoch": pos.epoch, **{f"val/{k}": v for k, v in metrics.items()}})
        if pos.best is None or score > pos.best["score"]:
            pos.best = {"score": score, "step": pos.step, "epoch": pos.epoch}
            save_model_dir(self.model, self.tokenizer, self.out / "best_model")
        log.info("epoch %d val: %s", pos.epoch, ", ".join(f"{k}={v:.3f}" for k, v in metrics.items() if isinstance(v, float)))

    def _finish(self) -> dict[str, Any]:
        skips = runstate.merged_skips(self.skips, self.world)  # every rank's
        summary: dict[str, Any] = {"steps": self.pos.step, "skipped": skips.to_dict(),
                                   "nonfinite_steps": self.pos.nonfinite_total}
        if self.last_val["step"] != self.pos.step:  # the run ended inside an epoch or right at its end
            self._validate()
        self._save()  # every rank: rank 0 writes, all meet at its barrier
        if self.rank == 0:
            model_dir = save_model_dir(self.model, self.tokenizer, self.out / "model")
            summary["model_dir"] = str(model_dir)
            if self.cfg.wise_ft is not None:
                summary["wise_ft"] = self._wise_ft()
            summary["best"] = self.pos.best
            summary["val"] = self.last_val
            if skips.skipped:
                log.warning("%s", skips.summary())
            plot_losses(self.out)
            write_json_atomic(self.out / "summary.json", summary)
        if self.world > 1:
            dist.barrier()
        return summary

    def _wise_ft(self) -> dict[str, Any]:
        """The WiSE-FT sweep between the starting and the fine-tuned weights, on the validation table (the new
        domain) and `reference_data` (the starting model's domain): `validation.wise_ft_sweep`."""
        ref = read_run_table(self.cfg.reference_data, self.cfg) if self.cfg.reference_data else None
        return wise_ft_sweep(self.model, self.tokenizer, self.device, self.initial_state, self.cfg.wise_ft, self.out,
                             self.val_table, ref, self.cfg.val_templates)


def plot_losses(out: Path) -> None:
    """`loss_curve.png` of the training losses in `out/metrics.jsonl` (nothing when there are none)."""
    from ..report.plots import plot_loss_curve

    train = [(r["step"], r["loss"]) for r in RunLog(out / "metrics.jsonl").read() if r.get("loss") is not None]
    if train:
        steps, losses = zip(*train)
        plot_loss_curve(list(steps), list(losses), out / "loss_curve.png")


def train(cfg: TrainConfig, *, on_step: Optional[StepHook] = None, on_save: Optional[SaveHook] = None) -> dict[str, Any]:
    """Run one training job (what `clipkit train` calls); leaves no process group behind."""
    try:
        return Trainer(cfg, on_step=on_step, on_save=on_save).fit()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
