"""The streamed side of a run's data: tar shards read by `data.stream.ShardStream`, never held whole in memory.

A run's loader lives for the whole run (its workers keep their streams across epochs); an epoch is the next
`batches_per_epoch` batches of it. The position a checkpoint holds is each reader slot's (pass, raw samples
taken), recorded from the batches the run has trained on, so a killed run resumes bit for bit.
"""
from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from torch.utils.data import DataLoader

from ..data.samples import make_loader
from ..data.shards import CAPTION_EXTS, TarShardDataset, expand_shards, read_raw_shards, shard_sizes
from ..data.stream import ShardStream
from ..errors import DataError
from ..fileio import files_fingerprint
from ..model.config import PreprocessConfig
from ..model.tokenizer import Tokenizer
from ..model.transforms import Preprocess
from .config import TrainConfig, TrainingError

log = logging.getLogger("clipkit.train")
TOKENIZER_CAPTIONS = 20_000  # a caption BPE for a streamed run learns from the first captions of the shards


class ShardCaptions(Sequence):
    """The first `limit` captions of the shards (in shard order), read only when a caption tokenizer needs them."""

    def __init__(self, urls: list[str], allow_pipe: bool, limit: int = TOKENIZER_CAPTIONS) -> None:
        self.urls, self.allow_pipe, self.limit = urls, allow_pipe, limit
        self._items: Optional[list[str]] = None

    def _load(self) -> list[str]:
        if self._items is None:
            raw = read_raw_shards(self.urls, allow_pipe=self.allow_pipe)
            texts = (next((s[e] for e in CAPTION_EXTS if e in s), None) for s in raw if "shard_error" not in s)
            self._items = [t.decode("utf-8", errors="replace").strip()
                           for t in itertools.islice((t for t in texts if t), self.limit)]
        return self._items

    def __len__(self) -> int:
        return len(self._load())

    def __getitem__(self, i: Any) -> Any:
        return self._load()[i]


@dataclass
class ShardSource:
    """A run's tar shards: their URLs, the samples of one epoch, and captions for a tokenizer."""

    urls: list[str]
    num_samples: int
    captions: ShardCaptions
    fingerprint: str


def open_shards(cfg: TrainConfig) -> ShardSource:
    """The shards of `cfg.train_data`; the epoch length is `train_num_samples` or the shards' `sizes.json`."""
    if cfg.train_num_samples is not None and cfg.train_num_samples < 1:
        raise TrainingError(f"train_num_samples must be >= 1, got {cfg.train_num_samples}")
    urls = expand_shards(cfg.train_data, allow_pipe=cfg.allow_pipe)
    counted = shard_sizes(urls)
    num = cfg.train_num_samples if cfg.train_num_samples is not None else counted
    if num is None:
        raise DataError(f"{cfg.train_data}: no sizes.json lists every shard's sample count; pass "
                        "train_num_samples (--train-num-samples), or write the shards with `clipkit data shards`")
    if cfg.train_num_samples and counted and cfg.train_num_samples > counted:
        log.warning("train_num_samples %d is more than the %d samples of the shards: an epoch repeats some",
                    cfg.train_num_samples, counted)
    fingerprint = files_fingerprint(urls, extra={"num_samples": num})[:16]
    return ShardSource(urls, num, ShardCaptions(urls, cfg.allow_pipe), fingerprint)


class StreamData:
    """What a streamed run trains on: the same interface as `setup.RunData` (batches, position, restore)."""

    text_cache = None  # a locked text tower runs on every batch: there is no table of captions to cache
    counts_skips_per_batch = True

    def __init__(self, cfg: TrainConfig, source: ShardSource, pcfg: PreprocessConfig, tokenizer: Tokenizer,
                 rank: int, world: int) -> None:
        if cfg.style_augment:
            raise TrainingError("style_augment works on the decoded-image cache of a table; tar shards stream")
        reader = TarShardDataset(source.urls, Preprocess(pcfg, train=cfg.augment), tokenizer,
                                 allow_pipe=cfg.allow_pipe)
        self.cfg, self.fingerprint = cfg, source.fingerprint
        self.workers = max(1, cfg.num_workers)
        self.stream = ShardStream(reader, seed=cfg.seed, rank=rank, world=world, workers=self.workers,
                                  shuffle_buffer=cfg.shuffle_buffer)
        self.batches_per_epoch = source.num_samples // (cfg.batch_size * world)
        if self.batches_per_epoch == 0:
            raise TrainingError(f"{source.num_samples} samples per epoch is fewer than one global batch "
                                f"({cfg.batch_size} x {world})")
        self._loader: Optional[DataLoader] = None
        self._batches: Optional[Iterator[dict[str, Any]]] = None

    def batches(self, epoch: int, start_batch: int = 0) -> Iterator[dict[str, Any]]:
        """The batches of `epoch` from `start_batch` on; the first call starts the run's loader there."""
        if self._batches is None:
            done = epoch * self.batches_per_epoch + start_batch  # batch g of the run comes from slot g % workers
            self.stream.start(self.stream.positions, rotation=done)
            self._loader = make_loader(self.stream, self.cfg.batch_size, num_workers=self.cfg.num_workers,
                                       seed=self.cfg.seed)
            self._batches = iter(self._loader)
        for batch in itertools.islice(self._batches, self.batches_per_epoch - start_batch):
            self.stream.next_positions(batch.get("stream"))
            yield batch

    def position(self) -> dict[str, Any]:
        return {"kind": "shards", "workers": self.workers, "slots": [list(p) for p in self.stream.positions]}

    def restore(self, state: Optional[dict[str, Any]], ignore_config: bool = False) -> None:
        """Continue each slot where the checkpoint's run left it."""
        if state is None or state.get("kind") != "shards":
            raise TrainingError("the checkpoint holds no stream position (it was not written by a streamed run)")
        slots = [tuple(p) for p in state["slots"]]
        if len(slots) != self.workers:
            if not ignore_config:
                raise TrainingError(f"the checkpoint's stream was read by {len(slots)} loader worker(s), this run "
                                    f"has {self.workers}: resume with --workers {state['workers']} for an exact "
                                    "resume (resume_ignore_config=True starts the stream at a new pass)")
            log.warning("stream layout changed: every reader starts pass %d", max(p for p, _ in slots) + 1)
            slots = [(max(p for p, _ in slots) + 1, 0)] * self.workers
        self.stream.start(slots)  # type: ignore[arg-type]

    def close(self) -> None:
        """Stop the loader's workers (they would stream on forever)."""
        self._batches, self._loader = None, None
