"""Exact (brute-force) inner-product search and recall: the ground truth indexes are tuned and checked against.

Results follow FAISS conventions: `(scores [nq, k] float32, ids [nq, k] int64)`, best first, missing
results padded with id -1 and score -inf.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import faiss
import numpy as np


def check_vectors(vectors: Any, what: str = "vectors") -> np.ndarray:
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


def clean_results(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FAISS pads missing results with id -1 and score -FLT_MAX; make the score -inf so it sorts last."""
    ids = np.asarray(ids, dtype=np.int64)
    return np.where(ids < 0, np.float32(-np.inf), np.asarray(scores, np.float32)), ids


def empty_results(nq: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """`[nq, k]` results with nothing found."""
    return np.full((nq, k), -np.inf, np.float32), np.full((nq, k), -1, np.int64)


def pad_results(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut or pad `[nq, c]` results to exactly k columns (padding: id -1, score -inf)."""
    if ids.shape[1] >= k:
        return np.ascontiguousarray(scores[:, :k]), np.ascontiguousarray(ids[:, :k])
    fill_s, fill_i = empty_results(len(ids), k - ids.shape[1])
    return np.hstack([scores, fill_s]), np.hstack([ids, fill_i])


def exact_search(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force inner-product top-k (the ground truth for recall); pads with -1 / -inf when k > N."""
    xb = np.ascontiguousarray(vectors, dtype=np.float32)
    xq = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    if len(xb) == 0:
        return empty_results(len(xq), k)
    return pad_results(*clean_results(*faiss.knn(xq, xb, min(k, len(xb)), metric=faiss.METRIC_INNER_PRODUCT)), k)


def exact_search_blocks(blocks: Iterable[tuple[np.ndarray, np.ndarray]], queries: np.ndarray, k: int
                        ) -> tuple[np.ndarray, np.ndarray]:
    """`exact_search` over `(vectors, ids)` blocks, one block in memory at a time; returns the blocks' ids."""
    q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    heap = faiss.ResultHeap(len(q), k, keep_max=True)
    for vectors, ids in blocks:
        if len(vectors):
            scores, pos = exact_search(vectors, q, min(k, len(vectors)))
            heap.add_result(scores, np.where(pos >= 0, ids[np.maximum(pos, 0)], -1))
    heap.finalize()
    return clean_results(heap.D, heap.I)


def drop_self(ids: np.ndarray, self_ids: np.ndarray, k: int) -> np.ndarray:
    """Remove each query's own id from its row, keeping order, and keep k columns."""
    order = np.argsort(ids == self_ids[:, None], axis=1, kind="stable")
    return np.take_along_axis(ids, order, axis=1)[:, :k]


def hit_rate(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Fraction of the valid exact ids (>= 0) that appear anywhere in the same row of approx_ids."""
    valid = exact_ids >= 0
    found = (exact_ids[:, :, None] == approx_ids[:, None, :]).any(-1) & valid
    return float(found.sum() / max(valid.sum(), 1))


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int) -> float:
    """Recall@k: share of each query's true top-k found in its approximate top-k (pads -1 ignored)."""
    return hit_rate(np.asarray(approx_ids)[:, :k], np.asarray(exact_ids)[:, :k])
