"""Dataset items and batches: (pixels, token ids) samples of a pairs table, collation, exact skip counts.

A dataset item is `{"pixels", "input_ids", "attention_mask", "index"}` or, for an image that cannot be
read, `{"skip": (path, reason), "index"}`. A good item may carry `replaced`: the skip records of the bad
samples it stands in for (so batches keep their size). `collate` moves all skips into the batch so that the
main process counts them (exact across DataLoader workers) with a `SkipCounter`.
"""
from __future__ import annotations

import contextlib
import random
from collections import Counter
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, default_collate

from ..errors import DataError, ImageLoadError
from ..model.tokenizer import Tokenizer
from ..model.transforms import ImageSource, Preprocess
from .tables import PathLike, read_pairs

Sample = dict[str, Any]
MIN_SEEN_FOR_CHECK = 50
_TENSOR_KEYS = ("pixels", "input_ids", "attention_mask", "index")

@contextlib.contextmanager
def seeded_cpu_rng(seed: int) -> Iterator[None]:
    """Draws inside come from torch's CPU generator seeded with `seed`; its state outside is restored. Per sample:
    `torch.manual_seed` would also queue a lazy CUDA seed and record a stack trace (~2 ms a call)."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


def make_sample(pixels: torch.Tensor, caption: str, tokenizer: Optional[Tokenizer], index: int) -> Sample:
    """The dataset item for one good pair: pixels [3, S, S] and token ids [L]; no tokens without a tokenizer (a
    locked text tower's cached features stand in for them)."""
    if tokenizer is None:
        return {"pixels": pixels, "index": index}
    tokens = tokenizer([caption])
    return {"pixels": pixels, "input_ids": tokens["input_ids"][0], "attention_mask": tokens["attention_mask"][0],
            "index": index}


def load_sample(preprocess: Preprocess, tokenizer: Optional[Tokenizer], image: ImageSource, caption: str, index: int,
                name: str) -> Sample:
    """Preprocess `image` into a sample, or a `{"skip": (name, reason)}` record if it cannot be read."""
    try:
        pixels = preprocess(image)
    except ImageLoadError as e:
        return {"skip": (name, e.reason), "index": index}
    except Exception:  # noqa: BLE001 -- a per-sample failure must be counted, never kill the run
        return {"skip": (name, "decode_error"), "index": index}
    return make_sample(pixels, caption, tokenizer, index)


class PairDataset(Dataset):
    """Map-style dataset over a pairs table (DataFrame or anything `read_pairs` reads): row i -> a sample."""

    def __init__(self, table: Union[pd.DataFrame, PathLike], preprocess: Preprocess,
                 tokenizer: Optional[Tokenizer]) -> None:
        table = table if isinstance(table, pd.DataFrame) else read_pairs(table)
        self.table = table
        # Arrow string arrays, not lists of str: forked workers would copy every object on refcount writes
        self.images, self.captions = table["image"].astype("str").array, table["caption"].astype("str").array
        self.preprocess, self.tokenizer = preprocess, tokenizer

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Sample:
        path = str(self.images[i])
        return load_sample(self.preprocess, self.tokenizer, path, str(self.captions[i]), int(i), path)


def collate(batch: Sequence[Sample]) -> dict[str, Any]:
    """Stack the good samples; skipped images and shard errors travel as lists for the main process to count.

    `skipped` holds (path, reason) pairs and `skipped_index` their dataset indexes, in the same order (skip
    records first, then those replaced by good items). A batch whose samples were all skipped has
    `index.numel() == 0` (and empty tensors). A streamed batch carries its last item's `stream` position.
    """
    good = [b for b in batch if "pixels" in b]
    keys = [k for k in _TENSOR_KEYS if k in good[0]] if good else []
    out: dict[str, Any] = (default_collate([{k: b[k] for k in keys} for b in good]) if good else
                           {k: torch.empty(0, dtype=torch.long if k != "pixels" else torch.float32)
                            for k in _TENSOR_KEYS})
    skips = [b for b in batch if "skip" in b] + [r for b in good for r in b.get("replaced", ())]
    out["skipped"] = [b["skip"] for b in skips]
    out["skipped_index"] = [b["index"] for b in skips]
    out["shard_errors"] = ([b["shard_error"] for b in batch if "shard_error" in b]
                           + [e for b in good for e in b.get("shard_errors", ())])
    if any("key" in b for b in good):
        out["keys"] = [b.get("key") for b in good]
    if good and "stream" in good[-1]:
        out["stream"] = good[-1]["stream"]
    return out


class SkipCounter:
    """Counts skipped samples by reason across batches, and aborts when too much of the data is bad."""

    def __init__(self, max_examples: int = 10) -> None:
        self.seen = 0
        self.by_reason: Counter[str] = Counter()
        self.examples: list[str] = []
        self.bad_shards: list[str] = []
        self.max_examples = max_examples

    def add(self, path: str, reason: str) -> None:
        """Count one skipped sample (it also counts as seen)."""
        self.seen += 1
        self.by_reason[reason] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(str(path))

    def update(self, batch: dict[str, Any]) -> None:
        """Count one collated batch: its good samples, its skips and its shard errors."""
        self.seen += int(batch["index"].numel())
        for path, reason in batch["skipped"]:
            self.add(path, reason)
        self.bad_shards.extend(url for url, _ in batch.get("shard_errors", ()))

    @property
    def skipped(self) -> int:
        return sum(self.by_reason.values())

    @property
    def shard_errors(self) -> int:
        return len(self.bad_shards)

    @property
    def fraction(self) -> float:
        return self.skipped / self.seen if self.seen else 0.0

    def summary(self) -> str:
        """E.g. "skipped 3 of 200 images: decode_error 2, missing 1; first: a.jpg, b.jpg"."""
        text = f"skipped {self.skipped} of {self.seen} images"
        if self.skipped:
            reasons = ", ".join(f"{r} {n}" for r, n in self.by_reason.most_common())
            text += f": {reasons}; first: {', '.join(self.examples)}"
        if self.bad_shards:
            text += f"; {self.shard_errors} unreadable shard(s): {', '.join(self.bad_shards[:self.max_examples])}"
        return text

    def check(self, max_bad_fraction: float, *, final: bool = False) -> None:
        """Raise DataError when more than `max_bad_fraction` of the samples seen were skipped.

        Judged once `MIN_SEEN_FOR_CHECK` samples were seen (so one early bad file does not abort), or at the end.
        """
        if (final or self.seen >= MIN_SEEN_FOR_CHECK) and self.fraction > max_bad_fraction:
            raise DataError(f"too much bad data ({self.fraction:.1%} > max_bad_fraction {max_bad_fraction:.1%}): "
                            f"{self.summary()}")

    def to_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "skipped": self.skipped, "by_reason": dict(self.by_reason),
                "examples": list(self.examples), "bad_shards": list(self.bad_shards)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SkipCounter":
        """Restore counters saved with `to_dict` (e.g. from a checkpoint, to resume with exact counts)."""
        out = cls()
        out.seen, out.by_reason = int(d["seen"]), Counter(d["by_reason"])
        out.examples, out.bad_shards = list(d["examples"]), list(d.get("bad_shards", []))
        return out

    @classmethod
    def merge(cls, parts: Iterable[dict[str, Any]]) -> "SkipCounter":
        """One counter from several `to_dict`s (the ranks of a run): counts add, examples and shards concatenate."""
        out = cls()
        for d in parts:
            part = cls.from_dict(d)
            out.seen += part.seen
            out.by_reason.update(part.by_reason)
            out.examples = (out.examples + part.examples)[: out.max_examples]
            out.bad_shards += part.bad_shards
        return out


def seed_worker(worker_id: int) -> None:
    """Seed numpy and `random` in a DataLoader worker from torch's per-worker seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(dataset: Dataset, batch_size: int = 1, shuffle: bool = False, num_workers: int = 0, seed: int = 0,
                drop_last: bool = False, *, sampler: Optional[Sampler] = None,
                batch_sampler: Optional[Iterable[list[int]]] = None, collate_fn: Callable[[list], Any] = collate,
                pin_memory: Optional[bool] = None) -> DataLoader:
    """The project's DataLoader: `collate`, an order seeded by `seed` (or a `sampler` / `batch_sampler`), workers
    seeded by `seed_worker` and kept across epochs, and pinned memory (default: when CUDA is available).

    The loader's own generator also seeds the workers, so iterating never draws from the global torch RNG.
    """
    if shuffle and isinstance(dataset, IterableDataset):
        raise ValueError("a streamed dataset cannot be shuffled by the loader; use a shuffle buffer "
                         "(TarShardDataset(shuffle_buffer=), data.stream.ShardStream)")
    generator = torch.Generator()
    generator.manual_seed(seed)
    order: dict[str, Any] = ({"batch_sampler": batch_sampler} if batch_sampler is not None else
                             {"batch_size": batch_size, "shuffle": shuffle, "sampler": sampler, "drop_last": drop_last})
    return DataLoader(dataset, num_workers=num_workers, collate_fn=collate_fn, generator=generator,
                      worker_init_fn=seed_worker, persistent_workers=num_workers > 0,
                      pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory, **order)
