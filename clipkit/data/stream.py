"""The training stream of tar shards: each rank and loader worker reads its own shards, exactly resumable.

The shards are read in passes. Pass p orders all shards by a permutation seeded by (seed, p); reader slot
g of G = world x workers (rank r's loader worker w is slot r * workers + w) reads shards g, g + G, ... of that
order through a seeded shuffle buffer of raw, undecoded samples (webdataset's). A slot's stream never ends:
pass p + 1 follows pass p. Its position is (pass, raw samples taken from the pass); a resume re-reads that
many raw samples of the pass (bytes only, nothing decoded) and goes on bit for bit.

Every item is a good sample. A bad one (unreadable image, no caption, oversize member, broken shard) is
replaced by the next sample of the same slot and travels, to be counted, in the item's `replaced` list, so
that batches have equal shapes on every rank. Augmentation draws from a seed of (seed, pass, slot, position).
"""
from __future__ import annotations

import random
from typing import Iterator, Optional, Sequence

import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from ..errors import DataError
from .samples import Sample, seeded_cpu_rng
from .shards import TarShardDataset

Position = tuple[int, int]  # (pass, raw samples taken from that pass)


def _mix(*parts: int) -> int:
    """One 63-bit seed from several integers (deterministic, unlike `hash` of a tuple of strings)."""
    out = 0
    for part in parts:
        out = (out * 1_000_003 + part) % (1 << 63)
    return out


class ShardStream(IterableDataset):
    """This rank's endless stream of decoded samples, one slot per DataLoader worker (see the module docstring).

    `start(positions, rotation)` sets where each slot begins and which slot loader worker 0 serves (worker w
    serves slot (w + rotation) % workers), so that a resumed loader hands out batches in the original order.
    Items carry `stream = (slot, pass, taken)`: the slot's position after that item.
    """

    def __init__(self, reader: TarShardDataset, *, seed: int, rank: int = 0, world: int = 1, workers: int = 1,
                 shuffle_buffer: int = 1000) -> None:
        readers = world * workers
        if len(reader.urls) < readers:
            raise DataError(f"{len(reader.urls)} shard(s) for {world} rank(s) x {workers} loader worker(s): every "
                            "reader needs a shard of its own; write smaller shards (clipkit data shards "
                            "--shard-size) or use fewer --workers")
        self.reader, self.seed, self.rank, self.world, self.workers = reader, seed, rank, world, workers
        self.shuffle_buffer = shuffle_buffer
        self.positions: list[Position] = [(0, 0)] * workers
        self.rotation = 0

    def start(self, positions: Sequence[Position], rotation: int = 0) -> None:
        if len(positions) != self.workers:
            raise ValueError(f"need {self.workers} slot positions, got {len(positions)}")
        self.positions, self.rotation = [(int(p), int(c)) for p, c in positions], rotation % self.workers

    def shards_of(self, slot: int, pass_: int) -> list[str]:
        """The shards slot `slot` of this rank reads in pass `pass_`."""
        order = list(self.reader.urls)
        random.Random(_mix(self.seed, pass_)).shuffle(order)
        return order[self.rank * self.workers + slot::self.world * self.workers]

    def _raw(self, slot: int, pass_: int) -> Iterator[Sample]:
        samples = self.reader.read_shards({"url": u} for u in self.shards_of(slot, pass_))
        if self.shuffle_buffer <= 1:
            return samples
        seed = _mix(self.seed, pass_, self.rank * self.workers + slot)
        return wds.shuffle(self.shuffle_buffer, self.shuffle_buffer, seed=seed)(samples)

    def _decode(self, raw: Sample, slot: int, pass_: int, taken: int) -> Sample:
        if "shard_error" in raw:
            return raw
        with seeded_cpu_rng(_mix(self.seed, pass_, self.rank * self.workers + slot, taken)):
            return self.reader.decode(raw)

    def slot_items(self, slot: int) -> Iterator[Sample]:
        """The endless stream of slot `slot` from its start position."""
        pass_, skip = self.positions[slot]
        bad: list[Sample] = []
        while True:
            good = 0
            for taken, raw in enumerate(self._raw(slot, pass_), 1):
                if taken <= skip:
                    continue  # resuming: these were trained on before the checkpoint
                item = self._decode(raw, slot, pass_, taken)
                if "pixels" not in item:
                    bad.append(item)
                    continue
                good += 1
                item["replaced"] = [b for b in bad if "skip" in b]
                item["shard_errors"] = [b["shard_error"] for b in bad if "shard_error" in b]
                item["stream"] = (slot, pass_, taken)
                bad = []
                yield item
            if good == 0 and skip == 0:
                raise DataError(f"no usable sample in shards {self.shards_of(slot, pass_)} (rank {self.rank}, "
                                f"reader {slot}): {[b.get('skip') or b.get('shard_error') for b in bad[:5]]}")
            pass_, skip = pass_ + 1, 0

    def __iter__(self) -> Iterator[Sample]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != self.workers:
            raise DataError(f"stream laid out for {self.workers} loader worker(s), iterated by {workers}")
        return self.slot_items((worker + self.rotation) % self.workers)

    def next_positions(self, last: Optional[tuple[int, int, int]]) -> None:
        """Record a consumed item's `stream` tag as its slot's new start (what a checkpoint saves)."""
        if last is not None:
            slot, pass_, taken = last
            self.positions[slot] = (pass_, taken)
