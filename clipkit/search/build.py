"""Making a FAISS index: the `auto` factory rule, seeded training, per-call search parameters and tuned defaults.

Shared by the in-memory build (`SearchIndex.build`) and the on-disk build of a collection, so both choose,
train and tune an index the same way.
"""
from __future__ import annotations

import math
import os

import faiss
import numpy as np

from .exact import drop_self, hit_rate
from .io import core_index

FLAT_MAX_N, HNSW_MAX_N = 50_000, 1_000_000
EVAL_QUERIES = 200


def _nlist(n: int) -> int:
    """IVF list count: ~4*sqrt(n), at most n/39 (FAISS's minimum training points per centroid)."""
    return int(max(1, min(4 * math.sqrt(n), n // 39, 65_536)))


def _pq_m(n: int, d: int, budget: int | None) -> int:
    """Sub-quantizer count for 4-bit PQ: d/4 by default, fewer while n vectors exceed the budget."""
    fits = [m for m in range(1, max(1, d // 4) + 1) if d % m == 0]
    if budget is not None:
        fits = [m for m in fits if n * (math.ceil(m / 2) + 16) <= budget]
        if not fits:
            raise ValueError(f"memory budget {budget} bytes cannot hold {n} vectors even as 1-byte PQ codes")
    return fits[-1]


def default_memory_budget() -> int:
    """Half of this machine's physical memory: what `auto` may spend on an index when no budget is given."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def choose_factory(n: int, d: int, memory_budget_bytes: int | None = None) -> str:
    """The `auto` rule: the cheapest FAISS factory string that is exact or near-exact for n vectors of dim d.

    - n < 50k and full vectors fit the budget: `Flat` (exact, no training);
    - n < 1M and vectors + graph (~4d+272 B/vector) fit: `HNSW32`;
    - any n whose full vectors fit (4d+16 B/vector): `IVF{nlist},Flat` (near-exact with tuned nprobe);
    - only when no full-precision layout fits: `IVF{nlist},PQ{m}x4fsr`, 4-bit fast-scan PQ on residuals,
      m = d/4 sub-quantizers (m/2 bytes per vector), fewer until n*(m/2+16) fits the budget.
    The budget defaults to half of physical memory. nlist = 4*sqrt(n), clamped to [1, min(65536, n/39)].
    Budgets count the index in RAM, not vectors.npy (memory-mapped). Pair the PQ layout with
    `search(..., rerank=r)` to recover exact ranking.
    """
    if n < 0 or d < 1:
        raise ValueError(f"need n >= 0 and d >= 1, got n={n}, d={d}")
    budget = default_memory_budget() if memory_budget_bytes is None else memory_budget_bytes
    if n < FLAT_MAX_N and n * (4 * d + 8) <= budget:  # + 8 B: the IDMap's id
        return "Flat"
    if n < HNSW_MAX_N and n * (4 * d + 2 * 32 * 4 + 16) <= budget:  # level-0 graph links
        return "HNSW32"
    if n * (4 * d + 16) <= budget:  # ids in the inverted lists too
        return f"IVF{_nlist(n)},Flat"
    return f"IVF{_nlist(n)},PQ{_pq_m(n, d, budget)}x4fsr"


def resolve_factory(kind: str, n: int, d: int, memory_budget_bytes: int | None = None) -> str:
    """Map a kind name (auto, flat, hnsw, ivf, ivfpq) to a factory string; other strings pass through."""
    if kind == "auto":
        return choose_factory(n, d, memory_budget_bytes)
    if kind == "ivfpq":
        return f"IVF{_nlist(n)},PQ{_pq_m(n, d, memory_budget_bytes)}x4fsr"
    return {"flat": "Flat", "hnsw": "HNSW32", "ivf": f"IVF{_nlist(n)},Flat"}.get(kind, kind)


def make_index(d: int, factory: str) -> faiss.Index:
    """An empty inner-product index from a factory string; a bad string raises ValueError."""
    try:
        return faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ValueError(f"invalid FAISS factory string {factory!r}: {str(e).splitlines()[0]}") from None


def train_rows(n: int, train_sample: int, seed: int) -> np.ndarray:
    """The sorted, seeded sample of row numbers an index trains on (the same in memory and on disk)."""
    return np.sort(np.random.default_rng(seed).choice(n, min(n, train_sample), replace=False))


def train(index: faiss.Index, sample: np.ndarray) -> None:
    """Train IVF centroids / PQ codebooks on `sample`; the index must need training."""
    if len(sample) == 0:
        raise ValueError("this index kind needs training vectors; build it from a non-empty collection")
    try:
        index.train(sample)
    except RuntimeError as e:
        raise ValueError(f"training failed ({len(sample)} vectors): {str(e).splitlines()[0]}") from None


def eval_rows(n: int, seed: int) -> np.ndarray:
    """The seeded held-out rows whose neighbours tune and measure an index of n vectors."""
    return np.random.default_rng(seed).choice(n, min(EVAL_QUERIES, n), replace=False)


def search_params(index: faiss.Index, n: int, nprobe: int | None, ef_search: int | None, widen: int = 1,
                  sel: faiss.IDSelector | None = None) -> faiss.SearchParameters:
    """A fresh per-call SearchParameters; unset knobs copy the index defaults (FAISS's are nprobe=1).

    FAISS 1.15 HNSW does not raise efSearch to k, so a k=100 search at efSearch=16 returns a
    16-wide beam padded out: efSearch is max(ef, n) here. `widen` multiplies nprobe/efSearch.
    """
    core, kw = core_index(index), {} if sel is None else {"sel": sel}
    if isinstance(core, faiss.IndexIVF):
        base = core.nprobe if nprobe is None else nprobe
        return faiss.SearchParametersIVF(nprobe=min(base * widen, core.nlist), **kw)
    if isinstance(core, faiss.IndexHNSW):
        base = core.hnsw.efSearch if ef_search is None else ef_search
        return faiss.SearchParametersHNSW(efSearch=max(base * widen, n), **kw)
    return faiss.SearchParameters(**kw)


def tune_knobs(index: faiss.Index, q: np.ndarray, self_ids: np.ndarray, truth: np.ndarray, target: float) -> dict:
    """Set the smallest default nprobe (>= 16) / efSearch (>= 128) at which held-out rows `q` (ids `self_ids`)
    find `target` of `truth`, their exact top-10 without themselves; floors because real queries are harder.
    Build time only (the index is not shared yet); returns the chosen knob."""
    n, core = index.ntotal, core_index(index)
    if isinstance(core, faiss.IndexIVF):
        for p in sorted({min(2 ** i, core.nlist) for i in range(4, 17)}):
            core.nprobe = p
            # "10@100": what a rerank can recover; the same as recall@10 for flat-coded lists
            ids = index.search(q, min(101, n), params=search_params(index, 101, None, None))[1]
            if hit_rate(ids, truth) >= target:
                break
        return {"nprobe": int(core.nprobe)}
    if isinstance(core, faiss.IndexHNSW):
        for ef in (128, 256, 512):
            core.hnsw.efSearch = ef
            ids = index.search(q, 11, params=search_params(index, 11, None, None))[1]
            if hit_rate(drop_self(ids, self_ids, 10), truth) >= target:
                break
        return {"efSearch": int(core.hnsw.efSearch)}
    return {}
