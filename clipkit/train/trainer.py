"""Trainer: contrastive fine-tuning with exact resume, global negatives under torchrun, gradient cache.

`Trainer(TrainConfig(...)).fit()` is what `clipkit train` runs. One process or many (torchrun sets
RANK/WORLD_SIZE; gloo on CPU, nccl on CUDA); only rank 0 writes files.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import pandas as pd
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from . import runstate
from ..formats.auto import load as load_model
from ..formats.native import save as save_model_dir
from ..errors import ClipkitError
from ..model.factory import create_model_and_tokenizer
from ..fileio import files_fingerprint, write_json_atomic
from .losses import create_loss, grad_cache_step, world_info
from ..model.clip import CLIPModel
from ..model.tokenizer import Tokenizer, train_bpe

log = logging.getLogger("clipkit.train")
NO_DECAY = ("embedding", "cls_token", "pos_embed")  # token/position tables; biases, norms and scales are 1-D


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
    image_col: str = "image"
    caption_col: str = "caption"
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
    wise_ft: Optional[float] = None
    reference_data: Optional[str] = None  # a table of the starting model's domain: WiSE-FT reports on it too
    resume: bool = False
    resume_ignore_config: bool = False
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    # fields that may change between a run and its resume without changing the result
    RESUME_FREE = ("resume", "resume_ignore_config", "progress", "num_workers", "log_every",
                   "checkpoint_every", "keep_checkpoints", "val_data", "output")


class EpochSampler(Sampler[int]):
    """A seeded permutation per epoch, rank r taking its slice of every global batch, from a batch offset.

    Yields keys `epoch * n + index` so the dataset can seed augmentation per sample and epoch: a
    resumed run then sees exactly the samples and augmentations the uninterrupted one would.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.epoch, self.start_batch = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return self.n // (self.batch_size * self.world)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)
        gb = self.batch_size * self.world
        for b in range(self.start_batch, self.batches_per_epoch):
            mine = perm[b * gb + self.rank * self.batch_size: b * gb + (self.rank + 1) * self.batch_size]
            yield from (self.epoch * self.n + int(i) for i in mine)

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size


class SeededSamples(Dataset):
    """Wraps a dataset so sample `key = epoch * n + i` is drawn under its own RNG seed (exact resume)."""

    def __init__(self, dataset: Dataset, n: int, seed: int) -> None:
        self.dataset, self.n, self.seed = dataset, n, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: int) -> dict[str, Any]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + key)
            item = self.dataset[key % self.n]
        item["index"] = key % self.n
        return item


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no decay on biases, norms, embeddings, tokens and the logit scale/bias."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or any(k in name for k in NO_DECAY)
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cosine_with_warmup(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the base lr over `warmup` steps, then cosine decay to 0 at `total`."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(warmup, 1)
        progress = (step - warmup) / max(total - warmup, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def data_fingerprint(table: pd.DataFrame) -> str:
    """Image files (path, size, mtime) and captions: a resume on other data is refused."""
    return files_fingerprint(table["image"].astype(str), extra=table["caption"].astype(str).tolist())[:16]


def init_distributed() -> tuple[int, int, torch.device]:
    """Join the torchrun process group if launched by torchrun; returns (rank, world, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    rank, world = world_info()
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def _diff(old: dict[str, Any], new: dict[str, Any], free: tuple[str, ...]) -> list[str]:
    keys = sorted((set(old) | set(new)) - set(free))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


class Trainer:
    """Owns the model, data, optimizer and checkpoints of one run; `fit()` trains to the end."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.rank, self.world, self.device = init_distributed()
        self.out = Path(cfg.output)
        self.ckpt_root = self.out / "checkpoints"
        torch.manual_seed(cfg.seed)
        self.table = self._read_table(cfg.train_data)
        self.val_table = self._read_table(cfg.val_data) if cfg.val_data else None
        self.model, self.tokenizer = self._build_model()
        self.initial_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()} if cfg.wise_ft is not None else None
        self.skips = self._new_skip_counter()
        # with the decoded cache, unreadable rows are counted and dropped before training; else per batch
        self.counts_skips_per_batch = not cfg.cache_images
        self.dataset = self._build_dataset()
        self.text_cache = self._build_text_cache() if cfg.lock_text else None
        self.sampler = EpochSampler(len(self.table), cfg.batch_size, cfg.seed, self.rank, self.world)
        if self.sampler.batches_per_epoch == 0:
            raise TrainingError(f"{len(self.table)} usable pairs is fewer than one global batch ({cfg.batch_size} x {self.world})")
        self.total_steps = cfg.max_steps or cfg.epochs * self.sampler.batches_per_epoch
        warmup = min(cfg.warmup_steps, self.total_steps // 2)
        if warmup < cfg.warmup_steps:
            log.warning("warmup_steps %d is over half of the %d steps: using %d", cfg.warmup_steps, self.total_steps, warmup)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98),
                                           eps=1e-6, fused=True)  # one kernel for all tensors (CPU and CUDA)
        self.scheduler = cosine_with_warmup(self.optimizer, warmup, self.total_steps)
        self.loss_fn = create_loss(cfg.loss, **({"label_smoothing": cfg.label_smoothing} if cfg.loss == "clip" else {}))
        self.ddp = self._wrap_ddp()
        self.step, self.epoch, self.batch_in_epoch, self.nonfinite_total, self.nonfinite_run = 0, 0, 0, 0, 0
        self.best: Optional[dict[str, Any]] = None
        self.last_val: dict[str, Any] = {"step": None}
        self.fingerprint = data_fingerprint(self.table)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.out / "train_config.json", self._config_dict())
        if cfg.resume:
            self._resume()

    # ---- setup -------------------------------------------------------------------------------
    def _read_table(self, spec: str) -> pd.DataFrame:
        from ..data.tables import read_pairs

        return read_pairs(spec, image_col=self.cfg.image_col, caption_col=self.cfg.caption_col).reset_index(drop=True)

    def _build_model(self) -> tuple[CLIPModel, Tokenizer]:
        cfg = self.cfg
        if Path(cfg.model).exists():
            model, _, tok = load_model(cfg.model, arch=cfg.arch)
        else:
            model, tok = create_model_and_tokenizer(cfg.model, **({"text_tower": cfg.text_tower} if cfg.text_tower else {}))
            if cfg.train_tokenizer and model.config.text.hf_config.get("model_type") == "clip_text_model":
                tok = self._caption_tokenizer(model, tok)
        if cfg.loss == "siglip" and model.logit_bias is None:
            model.logit_bias = nn.Parameter(torch.tensor(-10.0))
            model.config.init_logit_bias = -10.0
        if cfg.lock_image:
            model.lock_image_tower()
        if cfg.lock_text:
            model.lock_text_tower()
        if cfg.grad_checkpointing:
            model.set_grad_checkpointing(True)
        return model.to(self.device).train(), tok

    def _caption_tokenizer(self, model: CLIPModel, default: Tokenizer) -> Tokenizer:
        """A BPE trained on the training captions (saved with the run so a resume reuses it)."""
        from ..model.tokenizer import load_tokenizer

        saved = self.out / "tokenizer"
        if (saved / "tokenizer.json").exists():
            return load_tokenizer(saved, default.context_length)
        vocab = model.config.text.hf_config["vocab_size"]
        tok = train_bpe(self.table["caption"].tolist(), vocab, default.context_length)
        if self.rank == 0:
            tok.save(saved)
        return tok

    def _new_skip_counter(self) -> Any:
        from ..data.samples import SkipCounter

        return SkipCounter()

    def _build_dataset(self) -> Dataset:
        from ..data.samples import PairDataset
        from ..model.transforms import Preprocess

        pcfg = self.model.config.preprocess
        if self.cfg.cache_images:
            from ..data.cache import CachedPairDataset

            cache = self._decoded_cache(pcfg)
            self._drop_unreadable(cache)
            ds: Dataset = CachedPairDataset(self.table, cache, self.tokenizer, pcfg, train=self.cfg.augment)
        else:
            ds = PairDataset(self.table, Preprocess(pcfg, train=self.cfg.augment), self.tokenizer)
        return SeededSamples(ds, len(self.table), self.cfg.seed)

    def _drop_unreadable(self, cache: Any) -> None:
        """Remove rows whose image failed to decode, counting them: every rank then has full batches."""
        rows = self.table["image"].astype(str).map(cache.rows)
        ok = rows.map(lambda r: bool(cache.valid[int(r)]) if r == r else False)
        for path, row in zip(self.table["image"][~ok], rows[~ok]):
            self.skips.add(path, cache.skipped.get(int(row), "decode_error") if row == row else "missing")
        self.skips.seen += int(ok.sum())
        self.skips.check(self.cfg.max_bad_fraction, final=True)
        self.table = self.table[ok.to_numpy()].reset_index(drop=True)

    def _decoded_cache(self, pcfg: Any) -> Any:
        from ..data.cache import DecodedCache

        path = self.out / "image_cache"
        if self.rank == 0:
            DecodedCache.build(self.table, pcfg, path, progress=self.cfg.progress)
        if self.world > 1:
            dist.barrier()
        return DecodedCache.open(path)

    @torch.no_grad()
    def _build_text_cache(self) -> torch.Tensor:
        """Pooled features of every caption through the locked text tower, computed once: `[N, W]`."""
        captions = self.table["caption"].tolist()
        chunks = []
        for i in tqdm(range(0, len(captions), 256), desc="locked text tower", disable=not self._show_progress()):
            chunks.append(self.model.text_pooled(self.tokenizer(captions[i: i + 256])).float().cpu())
        return torch.cat(chunks)

    def _wrap_ddp(self) -> nn.Module:
        if self.world == 1:
            return self.model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(self.model, device_ids=ids)

    def _show_progress(self) -> bool:
        return self.cfg.progress and self.rank == 0

    def _config_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self.cfg)
        d["world_size"] = self.world
        return d

    # ---- loop ----------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train to `total_steps`, validating each epoch; returns the final metrics."""
        cfg, bar = self.cfg, tqdm(total=self.total_steps, initial=self.step, desc="train", disable=not self._show_progress())
        window, t0, seen = [], time.perf_counter(), 0
        while self.step < self.total_steps:
            self.sampler.set_epoch(self.epoch, self.batch_in_epoch)
            for batch in DataLoader(self.dataset, batch_size=cfg.batch_size, sampler=self.sampler,
                                    num_workers=cfg.num_workers, collate_fn=self._collate, drop_last=True):
                loss = self._train_step(batch)
                self.step, self.batch_in_epoch = self.step + 1, self.batch_in_epoch + 1
                seen += len(batch["index"])
                if loss is not None:
                    window.append(loss)
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    rate = seen * self.world / max(time.perf_counter() - t0, 1e-9)
                    self._log_train(window, rate, bar)
                    window, t0, seen = [], time.perf_counter(), 0
                if self.step % cfg.checkpoint_every == 0 and self.step < self.total_steps:
                    self._save()
                runstate.maybe_crash_after(self.step)
                if self.step >= self.total_steps:
                    break
            else:
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                self._validate()
                continue
            break
        bar.close()
        return self._finish()

    def _collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        from ..data.samples import collate

        return collate(items)

    def _autocast(self) -> Any:
        use_bf16 = self.cfg.precision == "bf16" or (self.cfg.precision == "auto" and self.device.type == "cuda")
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_bf16)

    def _train_step(self, batch: dict[str, Any]) -> Optional[float]:
        if self.counts_skips_per_batch:
            self.skips.update(batch)
            self.skips.check(self.cfg.max_bad_fraction)
        if len(batch["index"]) < 2:
            return None
        pixels = batch["pixels"].to(self.device, non_blocking=True)
        tokens = {k: batch[k].to(self.device) for k in ("input_ids", "attention_mask")}
        pooled = self.text_cache[batch["index"]].to(self.device) if self.text_cache is not None else None
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
        self.nonfinite_total += 1
        self.nonfinite_run += 1
        step = self.step + 1  # 1-based, like checkpoint names (step N = after N steps)
        log.warning("non-finite loss at step %d: step skipped (%d in a row)", step, self.nonfinite_run)
        if self.nonfinite_run >= self.cfg.max_nonfinite:
            good = runstate.list_checkpoints(self.ckpt_root)
            raise TrainingError(
                f"non-finite loss at step {step}, {self.nonfinite_run} steps in a row "
                f"(batch ids {batch['index'][:8].tolist()}); lower the lr or check the data. "
                f"Last good checkpoint: {good[-1] if good else 'none'}"
            )
        return None

    def _log_train(self, window: list[float], rate: float, bar: tqdm) -> None:
        if self.rank != 0:
            return
        rec = {"step": self.step, "epoch": self.epoch, "lr": self.scheduler.get_last_lr()[0],
               "loss": sum(window) / len(window) if window else None, "samples_per_s": round(rate, 2),
               "logit_scale": float(self.model.scales()[0].detach()), "skipped": self.skips.skipped, "nonfinite": self.nonfinite_total}
        bar.set_postfix(loss=f"{rec['loss']:.4f}" if rec["loss"] is not None else "nan", lr=f"{rec['lr']:.2e}", sps=f"{rate:.0f}")
        self._append_metrics(rec)

    def _append_metrics(self, rec: dict[str, Any]) -> None:
        with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")

    # ---- checkpoints ---------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        return {
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "rng": runstate.rng_state(), "skips": self.skips.to_dict(),
            "nonfinite_total": self.nonfinite_total, "best": json.dumps(self.best),
            "config": json.dumps(self._config_dict()), "fingerprint": self.fingerprint,
        }

    def _save(self) -> None:
        if self.rank == 0:
            path = runstate.save_checkpoint(self.ckpt_root, self.step, self.model, self._state(), self.cfg.keep_checkpoints)
            tqdm.write(f"saved step {self.step} to {path}") if self._show_progress() else log.info("saved step %d", self.step)
        if self.world > 1:
            dist.barrier()

    def _resume(self) -> None:
        runstate.clean_stale(self.ckpt_root)
        found = runstate.latest_good(self.ckpt_root, self.model)
        if found is None:
            log.warning("--resume: no usable checkpoint in %s; starting from scratch", self.ckpt_root)
            return
        path, state = found
        old = json.loads(state["config"])
        changed = _diff(old, self._config_dict(), TrainConfig.RESUME_FREE + ("extra",))
        if state["fingerprint"] != self.fingerprint:
            changed.append("training data (file list, captions, sizes or mtimes) changed")
        if changed and not self.cfg.resume_ignore_config:
            raise TrainingError(f"refusing to resume from {path}: the run changed:\n  " + "\n  ".join(changed)
                                + "\n(pass --resume-ignore-config to resume anyway)")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.skips = type(self.skips).from_dict(state["skips"])
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.nonfinite_total, self.best = state["nonfinite_total"], json.loads(state["best"])
        runstate.set_rng_state(state["rng"])
        msg = f"resumed from step {self.step} ({path})"
        print(msg, flush=True) if self.rank == 0 else None
        log.info(msg)

    # ---- validation and the end -----------------------------------------------------------------
    def embedder(self, model: Optional[CLIPModel] = None) -> Any:
        from ..embed import Embedder
        from ..model.transforms import Preprocess

        m = model if model is not None else self.model
        return Embedder(m, preprocess=Preprocess(m.config.preprocess), tokenizer=self.tokenizer, device=self.device, progress=False)

    def evaluate(self, model: Optional[CLIPModel] = None, table: Optional[pd.DataFrame] = None) -> dict[str, Any]:
        """Retrieval (and zero-shot when the table has labels) on the validation table."""
        from ..evaluate import runners as ev

        table = self.val_table if table is None else table
        if table is None:
            return {}
        rng = runstate.rng_state()  # evaluation must not perturb the training RNG stream
        emb = self.embedder(model)
        metrics = dict(ev.eval_retrieval(emb, table).metrics)
        if "label" in table.columns:
            metrics.update(ev.eval_zeroshot(emb, table).metrics)
        runstate.set_rng_state(rng)
        (model or self.model).train()
        return metrics

    def _validate(self) -> None:
        if self.rank != 0 or self.val_table is None:
            return
        metrics = self.evaluate()
        self.last_val = {"step": self.step, "epoch": self.epoch, **metrics}
        score = metrics.get("top1", (metrics.get("text_to_image_R@1", 0) + metrics.get("image_to_text_R@1", 0)) / 2)
        self._append_metrics({"step": self.step, "epoch": self.epoch, **{f"val/{k}": v for k, v in metrics.items()}})
        if self.best is None or score > self.best["score"]:
            self.best = {"score": score, "step": self.step, "epoch": self.epoch}
            save_model_dir(self.model, self.tokenizer, self.out / "best_model")
        if self._show_progress():
            tqdm.write(f"epoch {self.epoch} val: " + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items() if isinstance(v, float)))

    def _finish(self) -> dict[str, Any]:
        summary: dict[str, Any] = {"steps": self.step, "skipped": self.skips.to_dict(), "nonfinite_steps": self.nonfinite_total}
        if self.last_val["step"] != self.step:  # the run ended inside an epoch or right at its end
            self._validate()
        self._save()  # every rank: rank 0 writes, all meet at its barrier
        if self.rank == 0:
            model_dir = save_model_dir(self.model, self.tokenizer, self.out / "model")
            summary["model_dir"] = str(model_dir)
            if self.cfg.wise_ft is not None:
                summary["wise_ft"] = self._wise_ft()
            summary["best"] = self.best
            summary["val"] = self.last_val
            if self.skips.skipped:
                print(self.skips.summary())
            self._plot_loss()
            write_json_atomic(self.out / "summary.json", summary)
        if self.world > 1:
            dist.barrier()
        return summary

    def _wise_ft(self) -> dict[str, Any]:
        """Interpolate initial and fine-tuned weights; report initial, fine-tuned and mix on the new domain
        (validation table) and, with `reference_data`, on the starting model's domain: the trade-off."""
        alpha = float(self.cfg.wise_ft)
        ref = self._read_table(self.cfg.reference_data) if self.cfg.reference_data else None
        report: dict[str, Any] = {"alpha": alpha, **({"reference": {}} if ref is not None else {})}
        tuned = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        mixed = {k: (1 - alpha) * self.initial_state[k] + alpha * v if v.is_floating_point() else v for k, v in tuned.items()}
        save_model_dir(self.model, self.tokenizer, self.out / "model_finetuned")
        for name, state in (("finetuned", tuned), ("initial", self.initial_state), ("wise_ft", mixed)):
            self.model.load_state_dict(state)
            report[name] = self.evaluate()
            if ref is not None:
                report["reference"][name] = self.evaluate(table=ref)
        save_model_dir(self.model, self.tokenizer, self.out / "model")  # the mixed weights are loaded last
        return report

    def _plot_loss(self) -> None:
        from ..report.plots import plot_loss_curve

        path = self.out / "metrics.jsonl"
        if not path.exists():
            return
        recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        train = [(r["step"], r["loss"]) for r in recs if r.get("loss") is not None]
        if train:
            steps, losses = zip(*train)
            plot_loss_curve(list(steps), list(losses), self.out / "loss_curve.png")


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run one training job (what `clipkit train` calls); leaves no process group behind."""
    try:
        return Trainer(cfg).fit()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
