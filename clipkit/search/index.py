"""FAISS index over L2-normalised embeddings plus a metadata table: build, search, rerank, MMR, save/load.

Search follows FAISS contrib conventions: arrays in, `(scores [nq, k] float32, ids [nq, k] int64)` out,
an index kind named by its factory string. Ids are row numbers of `metadata`; removed rows are
tombstoned so ids never move. Per-call knobs (nprobe, efSearch, id filters) travel in
`faiss.SearchParameters*` objects, so one index can serve many threads at once.
"""
from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pandas as pd

from ..errors import IndexLoadError
from ..fileio import atomic_dir, atomic_path, json_safe, verify_manifest, write_json_atomic, write_manifest
from .io import (DELETED_COL, FORMAT_VERSION, check_index, core_index, link_or_copy,
                      ondisk_lists, read_faiss, read_info, read_meta, read_vectors)

MAX_K = 10_000
EXACT_FILTER_MAX = 4096  # filters allowing at most this many rows are searched exactly
RESERVED_KEYS = ("id", "score")
FLAT_MAX_N, HNSW_MAX_N = 50_000, 1_000_000


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


def _clean(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FAISS pads missing results with id -1 and score -FLT_MAX; make the score -inf so it sorts last."""
    ids = np.asarray(ids, dtype=np.int64)
    return np.where(ids < 0, np.float32(-np.inf), np.asarray(scores, np.float32)), ids


def _pad(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut or pad `[nq, c]` results to exactly k columns (padding: id -1, score -inf)."""
    if ids.shape[1] >= k:
        return np.ascontiguousarray(scores[:, :k]), np.ascontiguousarray(ids[:, :k])
    fill_s, fill_i = _empty(len(ids), k - ids.shape[1])
    return np.hstack([scores, fill_s]), np.hstack([ids, fill_i])


def _empty(nq: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((nq, k), -np.inf, np.float32), np.full((nq, k), -1, np.int64)


def exact_search(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force inner-product top-k (the ground truth for recall); pads with -1 / -inf when k > N."""
    xb = np.ascontiguousarray(vectors, dtype=np.float32)
    xq = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    if len(xb) == 0:
        return _empty(len(xq), k)
    return _pad(*_clean(*faiss.knn(xq, xb, min(k, len(xb)), metric=faiss.METRIC_INNER_PRODUCT)), k)


def _hit_rate(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Fraction of the valid exact ids (>= 0) that appear anywhere in the same row of approx_ids."""
    valid = exact_ids >= 0
    found = (exact_ids[:, :, None] == approx_ids[:, None, :]).any(-1) & valid
    return float(found.sum() / max(valid.sum(), 1))


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int) -> float:
    """Recall@k: share of each query's true top-k found in its approximate top-k (pads -1 ignored)."""
    return _hit_rate(np.asarray(approx_ids)[:, :k], np.asarray(exact_ids)[:, :k])


def _check_vectors(vectors: Any, what: str = "vectors") -> np.ndarray:
    """Validate a `[N, D]` finite, non-zero array and return an L2-normalised float32 copy."""
    x = np.asarray(vectors)
    if x.ndim != 2 or not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"{what} must be a 2-D real array [N, D], got shape {x.shape} dtype {x.dtype}")
    x = np.array(x, dtype=np.float32, order="C")  # one copy; float64 beyond float32 range becomes inf
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if bad.size:
        raise ValueError(f"{what} contain NaN or inf, or exceed float32 (rows {bad[:5].tolist()})")
    norms = np.sqrt(np.einsum("nd,nd->n", x, x, dtype=np.float64))  # float64: no overflow
    zero = np.flatnonzero(norms == 0)
    if zero.size:
        raise ValueError(f"{what} contain zero vectors, which have no direction (rows {zero[:5].tolist()})")
    x /= norms[:, None].astype(np.float32)
    return x


def _check_k(k: Any, name: str = "k", hi: int = MAX_K) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= hi:
        raise ValueError(f"{name} must be an integer in 1..{hi}, got {k!r}")
    return int(k)


def _check_metadata(metadata: Any, n: int) -> pd.DataFrame:
    """Metadata as a DataFrame with one row per vector, string column names, and a fresh RangeIndex."""
    if metadata is None:
        return pd.DataFrame(index=pd.RangeIndex(n))
    meta = pd.DataFrame(metadata).reset_index(drop=True)
    if len(meta) != n:
        raise ValueError(f"metadata has {len(meta)} rows but there are {n} vectors")
    if not all(isinstance(c, str) for c in meta.columns) or DELETED_COL in meta.columns:
        raise ValueError(f"metadata column names must be strings other than {DELETED_COL!r}")
    return meta


def _drop_self(ids: np.ndarray, self_ids: np.ndarray, k: int) -> np.ndarray:
    """Remove each query's own id from its row, keeping order, and keep k columns."""
    order = np.argsort(ids == self_ids[:, None], axis=1, kind="stable")
    return np.take_along_axis(ids, order, axis=1)[:, :k]


class SearchIndex:
    """A FAISS index (in an IndexIDMap2) + metadata rows + optional exact vectors for reranking."""

    def __init__(self, index: faiss.Index, metadata: pd.DataFrame, factory: str, *,
                 vectors: np.ndarray | None = None, deleted: np.ndarray | None = None,
                 model_id: str | None = None, build_report: dict | None = None) -> None:
        self.index, self.metadata, self.factory, self.dim = index, metadata, factory, int(index.d)
        self.vectors, self.model_id, self.build_report = vectors, model_id, build_report or {}
        self.deleted = np.zeros(len(metadata), bool) if deleted is None else deleted
        in_index = faiss.vector_to_array(index.id_map).astype(np.int64)
        self._masked = np.sort(in_index[self.deleted[in_index]])  # removed, but the index can't drop them

    def __len__(self) -> int:
        """Number of live (searchable) vectors."""
        return int(len(self.deleted) - self.deleted.sum())

    @classmethod
    def build(cls, vectors: np.ndarray, metadata: pd.DataFrame | None = None, kind: str = "auto",
              memory_budget_bytes: int | None = None, train_sample: int = 100_000, seed: int = 0,
              keep_vectors: bool = True, model_id: str | None = None) -> SearchIndex:
        """Build an index of `kind` (see `resolve_factory`), train it on a seeded sample, tune and measure it."""
        t0 = time.perf_counter()
        x = _check_vectors(vectors)
        n, d = x.shape
        meta = _check_metadata(metadata, n)
        factory = resolve_factory(kind, n, d, memory_budget_bytes)
        try:
            index = faiss.IndexIDMap2(faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT))
        except RuntimeError as e:
            raise ValueError(f"invalid FAISS factory string {factory!r}: {str(e).splitlines()[0]}") from None
        _train(index, x, train_sample, seed)
        index.add_with_ids(x, np.arange(n, dtype=np.int64))
        self = cls(index, meta, factory, vectors=x if keep_vectors else None, model_id=model_id)
        report = self._tune(x, seed)
        self.build_report = {
            "kind": kind, "factory": factory, "count": n,
            "build_seconds": round(time.perf_counter() - t0, 3),
            "bytes_per_vector": round(len(faiss.serialize_index(index)) / max(n, 1), 1), **report,
        }
        return self

    def _tune(self, x: np.ndarray, seed: int, n_queries: int = 200, target: float = 0.95) -> dict:
        """Set the smallest default nprobe (>= 16) / efSearch (>= 128) reaching `target` recall on up to
        200 held-out rows (own id excluded; floors because real queries are harder), report recall@10."""
        n = len(x)
        if n <= 10:
            return {"recall@10": None, "eval_queries": 0}
        qi = np.random.default_rng(seed).choice(n, min(n_queries, n), replace=False)
        q, truth = x[qi], _drop_self(exact_search(x, x[qi], 11)[1], qi, 10)
        core, out = core_index(self.index), {"eval_queries": len(qi)}
        if isinstance(core, faiss.IndexIVF):  # build time only: the index is not shared yet
            for p in sorted({min(2 ** i, core.nlist) for i in range(4, 17)}):
                core.nprobe = p
                # "10@100": what a rerank can recover; the same as recall@10 for flat-coded lists
                ids = self.index.search(q, min(101, n), params=self._search_params(101, None, None))[1]
                if _hit_rate(ids, truth) >= target:
                    break
            out["nprobe"] = int(core.nprobe)
        elif isinstance(core, faiss.IndexHNSW):
            for ef in (128, 256, 512):
                core.hnsw.efSearch = ef
                ids = self.index.search(q, 11, params=self._search_params(11, None, None))[1]
                if _hit_rate(_drop_self(ids, qi, 10), truth) >= target:
                    break
            out["efSearch"] = int(core.hnsw.efSearch)
        out["recall@10"] = round(_hit_rate(_drop_self(self.search(q, 11)[1], qi, 10), truth), 4)
        out["target_recall"] = target
        if out["recall@10"] < target:  # say so instead of quietly shipping a low-recall index
            out["warning"] = (f"recall@10 {out['recall@10']} is below the {target} target even at the widest "
                              "search setting; use search(..., rerank=r), a larger PQ, or IVF/Flat")
            logging.getLogger("clipkit.search").warning(out["warning"])
        if self.vectors is not None and out["recall@10"] < 1.0:
            ids = self.search(q, 11, rerank=10)[1]
            out["recall@10_rerank10"] = round(_hit_rate(_drop_self(ids, qi, 10), truth), 4)
        return out

    def _check_queries(self, queries: Any, what: str = "queries") -> np.ndarray:
        """`[D]` or `[nq, D]` real, finite, non-zero rows -> L2-normalised float32 `[nq, D]`."""
        q = np.asarray(queries)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2:
            raise ValueError(f"{what} must be 1-D [D] or 2-D [n, D], got shape {np.shape(queries)}")
        if q.shape[1] != self.dim:
            raise ValueError(f"{what} dim {q.shape[1]} does not match index dim {self.dim}")
        return _check_vectors(q, what)

    def _search_params(self, n: int, nprobe: int | None, ef_search: int | None, widen: int = 1,
                       sel: faiss.IDSelector | None = None) -> faiss.SearchParameters:
        """A fresh per-call SearchParameters; unset knobs copy the index defaults (FAISS's are nprobe=1).

        FAISS 1.15 HNSW does not raise efSearch to k, so a k=100 search at efSearch=16 returns a
        16-wide beam padded out: efSearch is max(ef, n) here. `widen` multiplies nprobe/efSearch.
        """
        core, kw = core_index(self.index), {} if sel is None else {"sel": sel}
        if isinstance(core, faiss.IndexIVF):
            base = core.nprobe if nprobe is None else nprobe
            return faiss.SearchParametersIVF(nprobe=min(base * widen, core.nlist), **kw)
        if isinstance(core, faiss.IndexHNSW):
            base = core.hnsw.efSearch if ef_search is None else ef_search
            return faiss.SearchParametersHNSW(efSearch=max(base * widen, n), **kw)
        return faiss.SearchParameters(**kw)

    def _check_knobs(self, nprobe: Any, ef_search: Any, rerank: Any, mmr: Any) -> None:
        core = core_index(self.index)
        for name, value, kind in (("nprobe", nprobe, faiss.IndexIVF), ("ef_search", ef_search, faiss.IndexHNSW)):
            if value is not None and not isinstance(core, kind):
                raise ValueError(f"{name} applies to {kind.__name__[5:]} indexes only, not {self.factory!r}")
            if value is not None:
                _check_k(value, name, 1 << 20)
        if not isinstance(rerank, (int, np.integer)) or isinstance(rerank, bool) or rerank < 0:
            raise ValueError(f"rerank must be an integer >= 0, got {rerank!r}")
        if mmr is not None and (isinstance(mmr, bool) or not isinstance(mmr, (int, float))
                                or not 0.0 <= mmr <= 1.0):
            raise ValueError(f"mmr must be a number in [0, 1], got {mmr!r}")
        if (rerank or mmr is not None) and self.vectors is None:
            raise ValueError("rerank and mmr need the stored vectors: build with keep_vectors=True")

    def _allowed_ids(self, filter: Any) -> np.ndarray | None:
        """Ids of live rows passing `filter` (query string, {column: value(s)}, bool mask or ids)."""
        if filter is None:
            return None
        rows = len(self.metadata)
        if isinstance(filter, str):
            try:
                res = self.metadata.eval(filter)
            except Exception as e:  # pandas raises many types for a bad expression
                raise ValueError(f"invalid filter {filter!r}: {e}") from None
            if not isinstance(res, pd.Series) or not pd.api.types.is_bool_dtype(res.dtype):
                raise ValueError(f"filter {filter!r} must evaluate to a boolean per row")
            mask = res.fillna(False).to_numpy(dtype=bool)
        elif isinstance(filter, Mapping):
            mask = np.ones(rows, bool)
            for col, want in filter.items():
                if col not in self.metadata.columns:
                    raise ValueError(f"filter column {col!r} not in metadata {list(self.metadata.columns)}")
                want = want if isinstance(want, (list, tuple, set, np.ndarray)) else [want]
                mask &= self.metadata[col].isin(list(want)).to_numpy()
        else:
            mask = _mask_from_array(np.asarray(filter), rows)
        return np.flatnonzero(mask & ~self.deleted)

    def _exact(self, q: np.ndarray, pool: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-n of q over the stored vectors of rows `pool`, in slices to bound memory."""
        heap = faiss.ResultHeap(len(q), n, keep_max=True)
        for lo in range(0, pool.size, 65_536):
            part = pool[lo:lo + 65_536]
            scores, pos = exact_search(self.vectors[part], q, min(n, part.size))
            heap.add_result(scores, np.where(pos >= 0, part[np.maximum(pos, 0)], -1))
        heap.finalize()
        return _clean(heap.D, heap.I)

    def _candidates(self, q: np.ndarray, n: int, allowed: np.ndarray | None, nprobe: int | None,
                    ef_search: int | None) -> tuple[np.ndarray, np.ndarray]:
        """Top-n from the index. Small filtered subsets are searched exactly; short answers (a
        filter correlated with the clusters, tombstones) are retried wider, then exactly."""
        live = len(self) if allowed is None else allowed.size
        n = min(n, max(live, 1))
        if live == 0:
            return _empty(len(q), n)
        if allowed is not None and self.vectors is not None and allowed.size <= EXACT_FILTER_MAX:
            return self._exact(q, allowed, n)
        sel = None
        if allowed is not None:
            sel = faiss.IDSelectorBatch(allowed)
        elif self._masked.size:
            sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(self._masked))
        boost = 1 if allowed is None else min(64, -(-len(self) // allowed.size))  # explore 1/selectivity more
        params = self._search_params(n, nprobe, ef_search, boost, sel)
        scores, ids = _clean(*self.index.search(q, n, params=params))
        for widen in (8 * boost, 64 * boost):
            short = np.flatnonzero((ids >= 0).sum(axis=1) < n)
            if short.size == 0:
                break
            params = self._search_params(n, nprobe, ef_search, widen, sel)
            scores[short], ids[short] = _clean(*self.index.search(q[short], n, params=params))
        short = np.flatnonzero((ids >= 0).sum(axis=1) < n)
        if short.size and self.vectors is not None:
            pool = allowed if allowed is not None else np.flatnonzero(~self.deleted)
            scores[short], ids[short] = self._exact(q[short], pool, n)
        return scores, ids

    def _rescore(self, q: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact inner products of candidates with the stored vectors, re-sorted best first."""
        scores = np.einsum("qcd,qd->qc", self.vectors[np.maximum(ids, 0)], q)  # [nq, C, D] -> [nq, C]
        scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
        order = np.argsort(-scores, axis=1, kind="stable")
        return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)

    def search(self, queries: np.ndarray, k: int = 10, *, nprobe: int | None = None,
               ef_search: int | None = None, rerank: int = 0, filter: Any = None,
               mmr: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product -> (scores [nq, k] float32, ids [nq, k] int64), best first.

        Queries are L2-normalised, so scores are cosine similarities. When fewer than k rows match,
        rows are padded with id -1 and score -inf; `results()` drops them. `rerank=r` re-scores k*r
        candidates exactly; `mmr=lambda` re-selects k of k*max(r, 4) candidates for diversity (scores
        are then query similarities in selection order). `filter` is a pandas expression over the
        metadata (trusted input only: pandas evaluates it), a {column: value(s)} mapping, a boolean
        mask or an array of ids. Thread-safe with other searches, not with add/remove.
        """
        q, k = self._check_queries(queries), _check_k(k)
        self._check_knobs(nprobe, ef_search, rerank, mmr)
        allowed = self._allowed_ids(filter)
        n = k * (max(rerank, 4) if mmr is not None else max(rerank, 1))
        scores, ids = self._candidates(q, n, allowed, nprobe, ef_search)
        if rerank or mmr is not None:
            scores, ids = self._rescore(q, ids)
        if mmr is not None:
            scores, ids = _mmr(q, scores, ids, self.vectors, k, float(mmr))
        return _pad(scores, ids, k)

    def results(self, scores: np.ndarray, ids: np.ndarray) -> list[list[dict]]:
        """Result objects `{"id", "score", **metadata}` per query, best first, JSON-safe, no -1 padding."""
        out = []
        for s_row, i_row in zip(np.atleast_2d(scores), np.atleast_2d(ids)):
            keep = i_row >= 0
            keep[keep] = ~self.deleted[i_row[keep]]
            rows = self.metadata.iloc[i_row[keep]].to_dict("records")
            out.append([
                {"id": int(i), "score": float(s),
                 **{c: json_safe(v) for c, v in r.items() if c not in RESERVED_KEYS}}
                for i, s, r in zip(i_row[keep], s_row[keep], rows)
            ])
        return out

    def add(self, vectors: np.ndarray, metadata_rows: Any = None) -> np.ndarray:
        """Append vectors (and their metadata rows); returns their new ids. Not thread-safe."""
        x = self._check_queries(vectors, "vectors")
        rows = _check_metadata(metadata_rows, len(x))
        ids = np.arange(len(self.metadata), len(self.metadata) + len(x), dtype=np.int64)
        if not len(x):
            return ids
        self.index.add_with_ids(x, ids)
        self.metadata = pd.concat([self.metadata, rows], ignore_index=True)
        self.deleted = np.concatenate([self.deleted, np.zeros(len(x), bool)])
        if self.vectors is not None:
            self.vectors = np.concatenate([self.vectors, x])  # an mmap becomes an in-memory copy
        return ids

    def remove(self, ids: Any) -> int:
        """Tombstone rows by id so ids stay stable; returns how many live rows were removed."""
        ids = np.unique(np.asarray(ids, dtype=np.int64).ravel())
        if ids.size and (ids.min() < 0 or ids.max() >= len(self.metadata)):
            raise ValueError(f"ids to remove must be in 0..{len(self.metadata) - 1}")
        ids = ids[~self.deleted[ids]]
        if not ids.size:
            return 0
        # IndexIDMap.remove_ids assumes the sub-index compacts like IndexFlat. IVF keeps its internal
        # labels (the id map would silently point at the wrong rows, then abort) and HNSW cannot
        # delete, so those keep the vectors and exclude them at search time.
        if isinstance(core_index(self.index), faiss.IndexFlatCodes):
            self.index.remove_ids(faiss.IDSelectorBatch(ids))
        else:
            self._masked = np.union1d(self._masked, ids)
        self.deleted[ids] = True
        return int(ids.size)

    def info(self) -> dict:
        """The `index.json` record: what a loader needs to check the files against each other."""
        return {"format_version": FORMAT_VERSION, "factory": self.factory, "dim": self.dim,
                "count": int(self.index.ntotal), "rows": len(self.metadata), "metric": "ip",
                "normalized": True, "model_id": self.model_id, "has_vectors": self.vectors is not None,
                "build_report": self.build_report}

    def save(self, directory: str | Path) -> Path:
        """Write the index directory atomically: old or new, never a mix, with a sha256 manifest."""
        with atomic_dir(directory) as tmp:
            with atomic_path(tmp / "index.faiss") as p:  # write_index truncates its target first
                faiss.write_index(self.index, str(p))
            lists = ondisk_lists(self.index)
            if lists is not None:  # index.faiss names the list data; load looks for it beside index.faiss
                link_or_copy(Path(lists.filename), tmp / Path(lists.filename).name)
            self.metadata.assign(**{DELETED_COL: self.deleted}).to_parquet(tmp / "meta.parquet", index=False)
            if self.vectors is not None:
                np.save(tmp / "vectors.npy", self.vectors)
            write_json_atomic(tmp / "index.json", self.info())
            write_manifest(tmp)
        return Path(directory)

    @classmethod
    def load(cls, directory: str | Path, *, expected_dim: int | None = None, mmap: bool = True,
             verify: bool = True) -> SearchIndex:
        """Load and cross-check a saved index; any inconsistency raises IndexLoadError, never half-loads."""
        d = Path(directory)
        info = read_info(d)
        if verify and not verify_manifest(d, IndexLoadError):
            raise IndexLoadError(f"{d}: missing manifest.json (pass verify=False to skip checksums)")
        index = read_faiss(d / "index.faiss")
        check_index(d, index, info, expected_dim)
        meta, deleted = read_meta(d / "meta.parquet", index)
        vectors = read_vectors(d / "vectors.npy", (len(meta), index.d), mmap) if info["has_vectors"] else None
        return cls(index, meta, info["factory"], vectors=vectors, deleted=deleted,
                   model_id=info.get("model_id"), build_report=info.get("build_report"))


def _mask_from_array(arr: np.ndarray, rows: int) -> np.ndarray:
    """A boolean mask of length `rows`, or an array of ids, as a boolean mask."""
    if arr.dtype == bool:
        if arr.shape != (rows,):
            raise ValueError(f"boolean filter mask must have shape ({rows},), got {arr.shape}")
        return arr
    if arr.ndim != 1 or arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError("filter must be a query string, a mapping, a boolean mask or a 1-D array of ids")
    if arr.size and (arr.min() < 0 or arr.max() >= rows):
        raise ValueError(f"filter ids must be in 0..{rows - 1}")
    mask = np.zeros(rows, bool)
    mask[arr.astype(np.int64)] = True
    return mask


def _train(index: faiss.Index, x: np.ndarray, train_sample: int, seed: int) -> None:
    """Train on a seeded sample of rows (IVF centroids, PQ codebooks); a no-op for Flat/HNSW."""
    if index.is_trained:
        return
    if len(x) == 0:
        raise ValueError("this index kind needs training vectors; build it from a non-empty collection")
    rows = np.random.default_rng(seed).choice(len(x), min(len(x), train_sample), replace=False)
    try:
        index.train(x[np.sort(rows)])
    except RuntimeError as e:
        raise ValueError(f"training failed ({len(rows)} vectors): {str(e).splitlines()[0]}") from None


def _mmr(q: np.ndarray, rel: np.ndarray, ids: np.ndarray, vectors: np.ndarray, k: int,
         lam: float) -> tuple[np.ndarray, np.ndarray]:
    """Maximal Marginal Relevance: greedily pick argmax lam*sim(q, c) - (1-lam)*max_sim(c, picked)."""
    nq, c = ids.shape
    cand = vectors[np.maximum(ids, 0)]  # [nq, C, D]
    penalty = np.zeros((nq, c), np.float32)
    avail = ids >= 0
    rows = np.arange(nq)
    out_s, out_i = np.full((nq, k), -np.inf, np.float32), np.full((nq, k), -1, np.int64)
    for t in range(min(k, c)):
        obj = np.where(avail, lam * rel - (1 - lam) * penalty, -np.inf)
        pick = obj.argmax(axis=1)
        ok = avail[rows, pick]
        out_s[ok, t], out_i[ok, t] = rel[rows, pick][ok], ids[rows, pick][ok]
        avail[rows, pick] = False
        sim = np.einsum("qcd,qd->qc", cand, cand[rows, pick])  # [nq, C]: similarity to the new pick
        penalty = sim if t == 0 else np.maximum(penalty, sim)
    return out_s, out_i
