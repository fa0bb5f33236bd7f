"""What a run starts from: the process group, the model and its tokenizer, and the data it trains on.

The data side reads the pairs table, decodes every image once into the run's cache (dropping and counting the
unreadable ones), wraps the samples so that each is drawn under its own seed (a bad one replaced by another, so
every rank's batch is full), and builds the epoch sampler and, for a locked text tower, the caption features
computed once. Tar shards stream instead (`streamdata`); both give the trainer the same small interface.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import pandas as pd
import torch
import torch.distributed as dist
from timm.layers import PatchDropout
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from ..data.augment import StyleAugment
from ..data.cache import CachedPairDataset, DecodedCache
from ..data.samples import PairDataset, SkipCounter, collate, make_loader, seeded_cpu_rng
from ..data.shards import is_streamed
from ..data.tables import read_pairs
from ..fileio import atomic_dir, files_fingerprint
from ..errors import ClipkitError, DataError
from ..formats.auto import load as load_model
from ..formats.hub import is_pretrained_name
from ..formats.pretrained import create_model_and_tokenizer
from ..model.clip import CLIPModel
from ..model.config import PreprocessConfig
from ..model.factory import bind_tokenizer, resolve_config, tokenizer_for
from ..model.precision import autocast, training_precision
from ..model.tokenizer import Tokenizer, load_tokenizer, train_bpe
from ..model.transforms import Preprocess
from .config import TrainConfig, TrainingError
from .losses import world_info
from .streamdata import ShardSource, StreamData, open_shards


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


# ---- model -------------------------------------------------------------------------------------------------


def build_model(cfg: TrainConfig, captions: list[str], out: Path, rank: int) -> tuple[CLIPModel, Tokenizer]:
    """The model and tokenizer a run starts from (pretrained by name, loaded from disk, or fresh from a preset),
    with the run's options applied: a SigLIP bias, locked towers or layer groups, gradient checkpointing."""
    if cfg.pretrained is not None or is_pretrained_name(cfg.model):
        if cfg.text_tower is not None:
            raise ClipkitError("text_tower replaces a preset's text tower; pretrained weights bring their own")
        model, tok = create_model_and_tokenizer(cfg.model, cfg.pretrained)
    elif Path(cfg.model).exists():
        model, _, tok = load_model(cfg.model, arch=cfg.arch)
    else:
        model, tok = fresh_model(cfg, captions, out, rank)
    if cfg.loss == "siglip" and model.logit_bias is None:
        model.logit_bias = nn.Parameter(torch.tensor(-10.0))
        model.config.init_logit_bias = -10.0
    lock_towers(model, cfg)
    if cfg.patch_dropout:
        set_patch_dropout(model, cfg.patch_dropout)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model, tok


def set_patch_dropout(model: CLIPModel, rate: float) -> None:
    """Drop `rate` of each image's patch tokens in training (FLIP; open_clip's `patch_dropout`): fewer tokens per
    step, and a regulariser. timm's `PatchDropout` acts in train mode only, and holds no weights, so the saved
    model and its config are those of the plain tower. Called again, it only changes the rate (the trainer sets 0
    for FLIP's unmasked tuning)."""
    visual = model.visual
    if not hasattr(visual, "patch_drop") or not hasattr(visual, "num_prefix_tokens"):
        raise ClipkitError(f"patch_dropout needs a timm ViT image tower; {type(visual).__name__} has no patch tokens "
                           "to drop")
    if isinstance(visual.patch_drop, PatchDropout):
        visual.patch_drop.prob = rate
    else:
        visual.patch_drop = PatchDropout(rate, num_prefix_tokens=visual.num_prefix_tokens)


def lock_towers(model: CLIPModel, cfg: TrainConfig) -> None:
    """`lock_image`/`lock_text` freeze a tower whole (its projection trains); `*_unlocked_groups/layers=N` freeze
    all but the last N layer groups, counted as open_clip counts them (`clipkit.model.groups`)."""
    if cfg.lock_image or cfg.lock_image_unlocked_groups is not None:
        model.lock_image_tower(cfg.lock_image_unlocked_groups, freeze_bn_stats=cfg.lock_image_freeze_bn_stats)
    if cfg.lock_text or cfg.lock_text_unlocked_layers is not None:
        model.lock_text_tower(cfg.lock_text_unlocked_layers, freeze_layer_norm=cfg.lock_text_freeze_layer_norm)


def fresh_model(cfg: TrainConfig, captions: list[str], out: Path, rank: int) -> tuple[CLIPModel, Tokenizer]:
    """A preset's model; a fresh CLIP text tower gets a BPE trained on the captions (with `train_tokenizer`),
    and the model's text config is bound to whichever tokenizer it gets (the end-of-text id it pools at)."""
    mcfg = resolve_config(cfg.model, text_tower=cfg.text_tower)
    if cfg.train_tokenizer and mcfg.text.hf_config.get("model_type") == "clip_text_model":
        tok = caption_tokenizer(captions, mcfg.text.hf_config["vocab_size"], mcfg.text.context_length,
                                out / "tokenizer", rank)
    else:
        tok = tokenizer_for(mcfg)
    return CLIPModel(bind_tokenizer(mcfg, tok)), tok


def caption_tokenizer(captions: list[str], vocab_size: int, context_length: int, saved: Path, rank: int) -> Tokenizer:
    """A BPE trained on the training captions, saved with the run (rank 0) so that a resume reuses it."""
    if (saved / "tokenizer.json").exists():
        return load_tokenizer(saved, context_length)
    tok = train_bpe(captions, vocab_size, context_length)
    if rank == 0:
        with atomic_dir(saved) as tmp:  # a kill mid-save must not leave a half-written tokenizer.json to resume with
            tok.save(tmp)
    return tok


# ---- data --------------------------------------------------------------------------------------------------


def read_run_table(spec: str, cfg: TrainConfig) -> pd.DataFrame:
    """A pairs table (or folder) read with the run's column names, rows numbered from 0."""
    return read_pairs(spec, image_column=cfg.image_column, caption_column=cfg.caption_column).reset_index(drop=True)


Source = Union[pd.DataFrame, ShardSource]


def open_source(cfg: TrainConfig) -> Source:
    """The run's training data: tar shards (streamed) or a pairs table / image folder (read whole)."""
    if is_streamed(cfg.train_data):
        return open_shards(cfg)
    if cfg.train_num_samples is not None or cfg.allow_pipe:
        raise TrainingError("train_num_samples and allow_pipe are for tar shards; an epoch of a table is its rows")
    return read_run_table(cfg.train_data, cfg)


def source_captions(source: Source) -> Sequence[str]:
    """The captions a caption tokenizer learns from (for shards: the first ones, read only if needed)."""
    return source.captions if isinstance(source, ShardSource) else source["caption"].tolist()


def data_fingerprint(table: pd.DataFrame) -> str:
    """Image files (path, size, mtime) and captions: a resume on other data is refused."""
    return files_fingerprint(table["image"].astype(str), extra=table["caption"].astype(str).tolist())[:16]


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
    """Wraps a dataset so sample `key = epoch * n + i` is drawn under its own RNG seed (exact resume).

    A sample that cannot be read is replaced by a row drawn under the same seed (another one if that fails
    too, up to `MAX_REPLACEMENTS`): the item then carries the skip records it replaced, to be counted. Every
    rank's batch stays full, as the all-gather of the loss and its `rank * B` labels need.
    """

    MAX_REPLACEMENTS = 32

    def __init__(self, dataset: Dataset, n: int, seed: int) -> None:
        self.dataset, self.n, self.seed = dataset, n, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: int) -> dict[str, Any]:
        with seeded_cpu_rng(self.seed * 1_000_003 + key):
            row = key % self.n
            item, replaced = self.dataset[row], []
            while "pixels" not in item:
                if len(replaced) == self.MAX_REPLACEMENTS:
                    raise DataError(f"{len(replaced)} samples in a row could not be read (last: {item['skip']})")
                replaced.append({**item, "index": row})
                row = int(torch.randint(self.n, ()))
                item = self.dataset[row]
        item["index"] = row
        if replaced:
            item["replaced"] = replaced
        return item


@dataclass
class RunData:
    """What a run trains on: the usable rows, their seeded samples, the sampler, its loader and the locked-text
    features. `StreamData` has the same interface for tar shards."""

    table: pd.DataFrame
    dataset: SeededSamples
    sampler: EpochSampler
    text_cache: Optional[torch.Tensor]  # [N, W] pooled caption features of a locked text tower
    fingerprint: str
    loader: DataLoader
    counts_skips_per_batch: bool  # without the decoded cache, unreadable images are met (and counted) as they come

    @property
    def batches_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch

    def batches(self, epoch: int, start_batch: int = 0) -> Iterator[dict[str, Any]]:
        """The batches of `epoch` from `start_batch` on."""
        self.sampler.set_epoch(epoch, start_batch)
        return iter(self.loader)

    def position(self) -> dict[str, Any]:
        return {"kind": "table"}  # the epoch and batch in it say it all

    def restore(self, state: Optional[dict[str, Any]], ignore_config: bool = False) -> None:
        if state is not None and state.get("kind") != "table" and not ignore_config:
            raise TrainingError("the checkpoint was written by a run on tar shards, this one reads a table")

    def close(self) -> None:
        pass


def build_data(cfg: TrainConfig, source: Source, model: CLIPModel, tokenizer: Tokenizer, skips: SkipCounter,
               out: Path, rank: int, world: int) -> Union[RunData, StreamData]:
    """The run's data; with the decoded cache, unreadable rows are counted in `skips` and dropped here (every
    rank then has full batches), without it they are replaced and counted per batch as they come."""
    pcfg = model.config.preprocess
    if isinstance(source, ShardSource):
        return StreamData(cfg, source, pcfg, tokenizer, rank, world)
    table = source
    locked_text = "text" in model.locked  # frozen whole and in eval mode: each caption's features never change
    sample_tokenizer = None if locked_text else tokenizer  # cached features stand in for the tokens
    if cfg.cache_images:
        cache = decoded_cache(table, pcfg, out / "image_cache", rank, world, cfg.progress)
        table = drop_unreadable(table, cache, skips, cfg.max_bad_fraction)
        style = StyleAugment(pcfg.image_size) if cfg.style_augment else None
        ds: Dataset = CachedPairDataset(table, cache, sample_tokenizer, pcfg, train=cfg.augment, style=style)
    else:
        ds = PairDataset(table, Preprocess(pcfg, train=cfg.augment), sample_tokenizer)
    sampler = EpochSampler(len(table), cfg.batch_size, cfg.seed, rank, world)
    if sampler.batches_per_epoch == 0:
        raise TrainingError(f"{len(table)} usable pairs is fewer than one global batch ({cfg.batch_size} x {world})")
    text_cache = None
    if locked_text:
        precision = training_precision(cfg.precision, model.logit_scale.device)
        text_cache = locked_text_features(model, tokenizer, table["caption"].tolist(), cfg.progress and rank == 0,
                                          precision)
    dataset = SeededSamples(ds, len(table), cfg.seed)
    loader = make_loader(dataset, cfg.batch_size, num_workers=cfg.num_workers, seed=cfg.seed, drop_last=True,
                         sampler=sampler, collate_fn=ds.collate if isinstance(ds, CachedPairDataset) else collate)
    return RunData(table, dataset, sampler, text_cache, data_fingerprint(table), loader, not cfg.cache_images)


def decoded_cache(table: pd.DataFrame, pcfg: PreprocessConfig, path: Path, rank: int, world: int,
                  progress: bool) -> DecodedCache:
    """Rank 0 builds (or reuses) the run's decoded-image cache; every rank then opens it."""
    if rank == 0:
        DecodedCache.build(table, pcfg, path, progress=progress)
    if world > 1:
        dist.barrier()
    return DecodedCache.open(path)


def drop_unreadable(table: pd.DataFrame, cache: DecodedCache, skips: SkipCounter,
                    max_bad_fraction: float) -> pd.DataFrame:
    """The rows whose image decoded; the others are counted in `skips` (too many raise DataError)."""
    rows = table["image"].astype(str).map(cache.rows)
    ok = rows.map(lambda r: bool(cache.valid[int(r)]) if r == r else False)
    for path, row in zip(table["image"][~ok], rows[~ok]):
        skips.add(path, cache.skipped.get(int(row), "decode_error") if row == row else "missing")
    skips.seen += int(ok.sum())
    skips.check(max_bad_fraction, final=True)
    return table[ok.to_numpy()].reset_index(drop=True)


@torch.no_grad()
def locked_text_features(model: CLIPModel, tokenizer: Tokenizer, captions: list[str], progress: bool,
                         precision: str = "fp32") -> torch.Tensor:
    """Pooled features of every caption through the locked text tower, computed once per distinct caption: `[N, W]`.

    Captions go through in batches of similar length (each batch is cut at its longest), under the run's training
    precision: the demo's 8,538 distinct captions took 59 s in fp32 in table order, 40 s sorted, 21 s sorted in bf16."""
    unique = sorted(dict.fromkeys(captions), key=len)  # many rows share a caption (one emoji in several art styles)
    device = model.logit_scale.device
    chunks = []
    with autocast(precision, device):
        for i in tqdm(range(0, len(unique), 256), desc="locked text tower", disable=not progress):
            chunks.append(model.text_pooled(tokenizer(unique[i: i + 256])).float().cpu())
    row = {c: i for i, c in enumerate(unique)}
    return torch.cat(chunks)[torch.tensor([row[c] for c in captions], dtype=torch.long)]
