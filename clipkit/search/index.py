"""FAISS index over L2-normalised embeddings plus a metadata table: search, rerank, MMR, filters, edits.

Search follows FAISS contrib conventions: arrays in, `(scores [nq, k] float32, ids [nq, k] int64)` out,
an index kind named by its factory string. Ids are row numbers of `metadata`; removed rows are
tombstoned so ids never move. Per-call knobs (nprobe, efSearch, id filters) travel in
`faiss.SearchParameters*` objects, so one index can serve many threads at once; `add`/`remove` take a
writer lock that searches share as readers. Filter strings follow the grammar in `filters` (never
`eval`). Building (factory rule, training, tuning) lives in `build`, the directory format in `io`.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pandas as pd

from ..fileio import json_safe
from .build import eval_rows, make_index, resolve_factory, search_params, train, train_rows, tune_knobs
from .exact import (check_vectors, clean_results, drop_self, empty_results, exact_search, exact_search_blocks,
                    hit_rate, pad_results)
from .filters import Compare, Logic, Member, filter_mask
from .io import DELETED_COL, FORMAT_VERSION, IndexFiles, core_index, read_index_dir, write_index_dir

MAX_K = 10_000
EXACT_FILTER_MAX = 4096  # filters allowing at most this many rows are searched exactly
EXACT_BLOCK = 65_536  # rows per slice of an exact search over the stored vectors
RESERVED_KEYS = ("id", "score")
TARGET_RECALL = 0.95
log = logging.getLogger("clipkit.search")


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


class ReadWriteLock:
    """Many readers or one writer; a waiting writer holds off new readers, so edits are not starved."""

    def __init__(self) -> None:
        self._cond, self._readers, self._writer, self._waiting = threading.Condition(), 0, False, 0

    @contextmanager
    def reading(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._writer and not self._waiting)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def writing(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            self._cond.wait_for(lambda: not self._writer and not self._readers)
            self._waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


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
        self.lock = ReadWriteLock()  # searches read, add/remove write

    def __len__(self) -> int:
        """Number of live (searchable) vectors."""
        return int(len(self.deleted) - self.deleted.sum())

    @classmethod
    def build(cls, vectors: np.ndarray, metadata: pd.DataFrame | None = None, kind: str = "auto",
              memory_budget_bytes: int | None = None, train_sample: int = 100_000, seed: int = 0,
              keep_vectors: bool = True, model_id: str | None = None) -> SearchIndex:
        """Build an index of `kind` (see `resolve_factory`), train it on a seeded sample, tune and measure it."""
        t0 = time.perf_counter()
        x = check_vectors(vectors)
        n, d = x.shape
        meta = _check_metadata(metadata, n)
        factory = resolve_factory(kind, n, d, memory_budget_bytes)
        index = faiss.IndexIDMap2(make_index(d, factory))
        if not index.is_trained:
            train(index, x[train_rows(n, train_sample, seed)])
        index.add_with_ids(x, np.arange(n, dtype=np.int64))
        built = cls(index, meta, factory, vectors=x if keep_vectors else None, model_id=model_id)
        report = {"recall@10": None, "eval_queries": 0}  # too few rows for a top-10
        if n > 10:
            qi = eval_rows(n, seed)
            report = tune(built, x[qi], qi, drop_self(exact_search(x, x[qi], 11)[1], qi, 10))
        built.build_report = {
            "kind": kind, "factory": factory, "count": n,
            "build_seconds": round(time.perf_counter() - t0, 3),
            "bytes_per_vector": round(len(faiss.serialize_index(index)) / max(n, 1), 1), **report,
        }
        return built

    def _check_queries(self, queries: Any, what: str = "queries") -> np.ndarray:
        """`[D]` or `[nq, D]` real, finite, non-zero rows -> L2-normalised float32 `[nq, D]`."""
        q = np.asarray(queries)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2:
            raise ValueError(f"{what} must be 1-D [D] or 2-D [n, D], got shape {np.shape(queries)}")
        if q.shape[1] != self.dim:
            raise ValueError(f"{what} dim {q.shape[1]} does not match index dim {self.dim}")
        return check_vectors(q, what)

    def _check_knobs(self, nprobe: Any, ef_search: Any, rerank: Any, mmr: Any) -> None:
        core = core_index(self.index)
        for name, value, kind, label in (("nprobe", nprobe, faiss.IndexIVF, "IVF"),
                                         ("ef_search", ef_search, faiss.IndexHNSW, "HNSW")):
            if value is not None and not isinstance(core, kind):
                raise ValueError(f"{name} applies to {label} indexes only, not {self.factory!r}")
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
        if isinstance(filter, (str, Compare, Member, Logic)):
            mask = filter_mask(filter, self.metadata)
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
        slices = (pool[lo:lo + EXACT_BLOCK] for lo in range(0, pool.size, EXACT_BLOCK))
        return exact_search_blocks(((self.vectors[part], part) for part in slices), q, n)

    def _candidates(self, q: np.ndarray, n: int, allowed: np.ndarray | None, nprobe: int | None,
                    ef_search: int | None) -> tuple[np.ndarray, np.ndarray]:
        """Top-n from the index. Small filtered subsets are searched exactly; short answers (a
        filter correlated with the clusters, tombstones) are retried wider, then exactly."""
        live = len(self) if allowed is None else allowed.size
        n = min(n, max(live, 1))
        if live == 0:
            return empty_results(len(q), n)
        if allowed is not None and self.vectors is not None and allowed.size <= EXACT_FILTER_MAX:
            return self._exact(q, allowed, n)
        sel = None
        if allowed is not None:
            sel = faiss.IDSelectorBatch(allowed)
        elif self._masked.size:
            sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(self._masked))
        boost = 1 if allowed is None else min(64, -(-len(self) // allowed.size))  # explore 1/selectivity more
        params = search_params(self.index, n, nprobe, ef_search, boost, sel)
        scores, ids = clean_results(*self.index.search(q, n, params=params))
        for widen in (8 * boost, 64 * boost):
            short = np.flatnonzero((ids >= 0).sum(axis=1) < n)
            if short.size == 0:
                break
            params = search_params(self.index, n, nprobe, ef_search, widen, sel)
            scores[short], ids[short] = clean_results(*self.index.search(q[short], n, params=params))
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
        are then query similarities in selection order). `filter` is a filter string (see `filters`:
        `style == "noto" and year >= 2020`; parsed, never evaluated as code) or its parsed tree, a
        {column: value(s)} mapping, a boolean mask or an array of ids. Thread-safe, also with add/remove.
        """
        with self.lock.reading():
            return self._search(queries, k, nprobe, ef_search, rerank, filter, mmr)

    def _search(self, queries: Any, k: Any, nprobe: Any, ef_search: Any, rerank: Any, filter: Any,
                mmr: Any) -> tuple[np.ndarray, np.ndarray]:
        q, k = self._check_queries(queries), _check_k(k)
        self._check_knobs(nprobe, ef_search, rerank, mmr)
        allowed = self._allowed_ids(filter)
        n = k * (max(rerank, 4) if mmr is not None else max(rerank, 1))
        scores, ids = self._candidates(q, n, allowed, nprobe, ef_search)
        if rerank or mmr is not None:
            scores, ids = self._rescore(q, ids)
        if mmr is not None:
            scores, ids = _mmr(q, scores, ids, self.vectors, k, float(mmr))
        return pad_results(scores, ids, k)

    def results(self, scores: np.ndarray, ids: np.ndarray) -> list[list[dict]]:
        """Result objects `{"id", "score", **metadata}` per query, best first, JSON-safe, no -1 padding."""
        with self.lock.reading():
            return self._results(scores, ids)

    def _results(self, scores: np.ndarray, ids: np.ndarray) -> list[list[dict]]:
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
        """Append vectors (and their metadata rows); returns their new ids. Waits for running searches."""
        x = self._check_queries(vectors, "vectors")
        rows = _check_metadata(metadata_rows, len(x))
        with self.lock.writing():
            return self._add(x, rows)

    def _add(self, x: np.ndarray, rows: pd.DataFrame) -> np.ndarray:
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
        with self.lock.writing():
            return self._remove(np.unique(np.asarray(ids, dtype=np.int64).ravel()))

    def _remove(self, ids: np.ndarray) -> int:
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
        with self.lock.reading():  # no edit lands halfway through the files
            return write_index_dir(directory, IndexFiles(self.index, self.metadata, self.deleted, self.vectors,
                                                         self.info()))

    @classmethod
    def load(cls, directory: str | Path, *, expected_dim: int | None = None, mmap: bool = True,
             verify: bool = True) -> SearchIndex:
        """Load and cross-check a saved index; any inconsistency raises IndexLoadError, never half-loads."""
        files = read_index_dir(directory, expected_dim, mmap, verify)
        return cls(files.index, files.metadata, files.info["factory"], vectors=files.vectors,
                   deleted=files.deleted, model_id=files.info.get("model_id"),
                   build_report=files.info.get("build_report"))


def tune(index: SearchIndex, q: np.ndarray, self_ids: np.ndarray, truth: np.ndarray,
         target: float = TARGET_RECALL) -> dict:
    """Tune the index's default nprobe/efSearch on held-out rows `q` (ids `self_ids`; `truth`: their exact
    top-10 without themselves) and report recall@10, plain and, when vectors are kept, with rerank 10."""
    out = {"eval_queries": len(q), **tune_knobs(index.index, q, self_ids, truth, target)}
    out["recall@10"] = round(hit_rate(drop_self(index.search(q, 11)[1], self_ids, 10), truth), 4)
    out["target_recall"] = target
    if out["recall@10"] < target:  # say so instead of quietly shipping a low-recall index
        out["warning"] = (f"recall@10 {out['recall@10']} is below the {target} target even at the widest "
                          "search setting; use search(..., rerank=r), a larger PQ, or IVF/Flat")
        log.warning(out["warning"])
    if index.vectors is not None and out["recall@10"] < 1.0:
        ids = index.search(q, 11, rerank=10)[1]
        out["recall@10_rerank10"] = round(hit_rate(drop_self(ids, self_ids, 10), truth), 4)
    return out


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


def _mmr(q: np.ndarray, rel: np.ndarray, ids: np.ndarray, vectors: np.ndarray, k: int,
         lam: float) -> tuple[np.ndarray, np.ndarray]:
    """Maximal Marginal Relevance: greedily pick argmax lam*sim(q, c) - (1-lam)*max_sim(c, picked)."""
    nq, c = ids.shape
    cand = vectors[np.maximum(ids, 0)]  # [nq, C, D]
    penalty = np.zeros((nq, c), np.float32)
    avail = ids >= 0
    rows = np.arange(nq)
    out_s, out_i = empty_results(nq, k)
    for t in range(min(k, c)):
        obj = np.where(avail, lam * rel - (1 - lam) * penalty, -np.inf)
        pick = obj.argmax(axis=1)
        ok = avail[rows, pick]
        out_s[ok, t], out_i[ok, t] = rel[rows, pick][ok], ids[rows, pick][ok]
        avail[rows, pick] = False
        sim = np.einsum("qcd,qd->qc", cand, cand[rows, pick])  # [nq, C]: similarity to the new pick
        penalty = sim if t == 0 else np.maximum(penalty, sim)
    return out_s, out_i
