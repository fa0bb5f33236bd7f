"""Near-duplicate images: pairs above a cosine threshold found by range search on the index, grouped into
connected components; each group keeps one member (the first id, or the best-ranked result).

Candidates come from FAISS `range_search` on the index itself (exact for Flat and IVF-Flat codes within the
searched lists), or, for compressed codes, over the stored exact vectors (else the codes, a wider radius);
then every pair is re-scored exactly on the stored vectors, so a reported similarity is the true cosine. Result lists are deduplicated the way clip-retrieval's
`deduplicate` option does it: components of the results' own similarity graph, the best-ranked kept.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import faiss
import numpy as np
import pandas as pd

from .build import search_params
from .exact import check_vectors
from .index import SearchIndex
from .io import core_index

DEFAULT_THRESHOLD = 0.95
CLIP_RETRIEVAL_THRESHOLD = 0.94  # clip-retrieval's `deduplicate` on results (KnnService.get_non_uniques)
CODE_MARGIN = 0.05  # compressed codes (PQ, SQ) misjudge cosines by about this much: search this much wider
MAX_PAIRS = 10_000_000
BATCH = 4096
EXACT_BLOCK = 65_536  # stored vectors per exact range-search block
_EXACT_CODES = (faiss.IndexFlat, faiss.IndexIVFFlat, faiss.IndexHNSWFlat)
log = logging.getLogger(__name__)


def check_threshold(threshold: Any) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold <= 1.0:
        raise ValueError(f"the near-duplicate threshold is a cosine similarity in (0, 1], got {threshold!r}")
    return float(threshold)


def stored_vectors(index: SearchIndex, ids: np.ndarray) -> np.ndarray:
    """The normalised vectors of rows `ids`: the stored exact ones, else reconstructed from the index codes."""
    ids = np.asarray(ids, np.int64)
    if index.vectors is not None:
        return np.asarray(index.vectors[ids], np.float32)
    try:
        return check_vectors(index.index.reconstruct_batch(ids))
    except RuntimeError:
        raise ValueError(f"this {index.factory} index keeps no vectors (built with keep_vectors=False) and cannot "
                         "reconstruct them: rebuild it with the vectors kept") from None


def _range_hits(index: SearchIndex, rows: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(row, hit) candidate pairs of `rows` with cosine about >= threshold. Exact codes: the index's own range
    search. Compressed codes misjudge cosines (4-bit PQ put a vector at 0.85 of itself), so with stored vectors
    the search runs exactly over them, block by block; without, on the codes with a CODE_MARGIN wider radius."""
    q = stored_vectors(index, rows)
    if isinstance(core_index(index.index), _EXACT_CODES) or index.vectors is None:
        exact = isinstance(core_index(index.index), _EXACT_CODES)
        lims, _, hits = index.index.range_search(q, threshold if exact else threshold - CODE_MARGIN,
                                                 params=search_params(index.index, 1, None, None))
        return np.repeat(rows, np.diff(lims).astype(np.int64)), hits.astype(np.int64)  # FAISS: uint64 limits
    found_a, found_b = [], []
    for lo in range(0, len(index.vectors), EXACT_BLOCK):
        block = faiss.IndexFlatIP(index.dim)
        block.add(np.ascontiguousarray(index.vectors[lo:lo + EXACT_BLOCK], np.float32))
        lims, _, hits = block.range_search(q, threshold - 1e-5)
        found_a.append(np.repeat(rows, np.diff(lims).astype(np.int64)))
        found_b.append(hits.astype(np.int64) + lo)
    return np.concatenate(found_a), np.concatenate(found_b)


def near_duplicate_pairs(index: SearchIndex, threshold: float = DEFAULT_THRESHOLD, *, batch: int = BATCH
                         ) -> pd.DataFrame:
    """Every pair of live rows with cosine >= `threshold`: columns `a < b` (ids) and `similarity`, most similar
    first. Range search on the index, so approximate indexes may miss pairs their searched lists do not hold."""
    threshold = check_threshold(threshold)
    with index.lock.reading():
        live = np.flatnonzero(~index.deleted)
        found_a, found_b, total = [], [], 0
        for lo in range(0, live.size, batch):
            a, hits = _range_hits(index, live[lo:lo + batch], threshold)
            keep = (hits > a) & (hits >= 0)
            keep[keep] = ~index.deleted[hits[keep]]
            found_a.append(a[keep])
            found_b.append(hits[keep])
            total += int(keep.sum())
            if total > MAX_PAIRS:
                raise ValueError(f"more than {MAX_PAIRS} pairs at cosine >= {threshold}: that is not near-duplicates; "
                                 "raise the threshold")
        a, b = (np.concatenate(x) if x else np.zeros(0, np.int64) for x in (found_a, found_b))
        pairs = np.unique(np.stack([a, b], 1), axis=0) if a.size else np.zeros((0, 2), np.int64)
        sim = _pair_similarity(index, pairs)
    ok = sim >= threshold
    order = np.lexsort((pairs[ok, 1], pairs[ok, 0], -sim[ok]))
    return pd.DataFrame({"a": pairs[ok, 0][order], "b": pairs[ok, 1][order], "similarity": sim[ok][order]})


def _pair_similarity(index: SearchIndex, pairs: np.ndarray) -> np.ndarray:
    out = np.zeros(len(pairs), np.float32)
    for lo in range(0, len(pairs), BATCH):
        p = pairs[lo:lo + BATCH]
        out[lo:lo + BATCH] = np.einsum("nd,nd->n", stored_vectors(index, p[:, 0]), stored_vectors(index, p[:, 1]))
    return out


def components(n: int, pairs: np.ndarray) -> np.ndarray:
    """Connected-component label of each of `n` nodes given edges `pairs` [m, 2] (node numbers 0..n-1);
    the label is the smallest node of the component."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    graph = coo_matrix((np.ones(len(pairs), np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    smallest = np.full(label.max() + 1 if n else 0, n, np.int64)
    np.minimum.at(smallest, label, np.arange(n))
    return smallest[label]


def duplicate_groups(pairs: pd.DataFrame, metadata: Optional[pd.DataFrame] = None) -> pd.DataFrame:
    """Groups of near-duplicates from `near_duplicate_pairs`: one row per member (`group`, `id`, `keep`: True for
    the group's smallest id, `similarity`: the member's highest cosine to another member), plus `metadata` rows."""
    ids = np.unique(pairs[["a", "b"]].to_numpy().ravel()) if len(pairs) else np.zeros(0, np.int64)
    edges = np.searchsorted(ids, pairs[["a", "b"]].to_numpy(np.int64))
    label = ids[components(len(ids), edges)] if len(ids) else ids
    best = pd.concat([pairs[["a", "similarity"]].rename(columns={"a": "id"}),
                      pairs[["b", "similarity"]].rename(columns={"b": "id"})]).groupby("id")["similarity"].max()
    out = pd.DataFrame({"group": pd.factorize(label, sort=True)[0], "id": ids, "keep": ids == label,
                        "similarity": best.reindex(ids).to_numpy(np.float32)})
    if metadata is not None and len(out):
        extra = metadata.drop(columns=[c for c in out.columns if c in metadata.columns])
        out = pd.concat([out, extra.iloc[ids].reset_index(drop=True)], axis=1)
    return out.sort_values(["group", "id"], ignore_index=True)


def remove_near_duplicates(index: SearchIndex, threshold: float = DEFAULT_THRESHOLD) -> dict:
    """Tombstone every near-duplicate but the first id of its group (ids stay stable); returns what was done."""
    groups = duplicate_groups(near_duplicate_pairs(index, threshold))
    removed = index.remove(groups.loc[~groups["keep"], "id"].to_numpy(np.int64))
    log.info("near-duplicates at cosine >= %s: %d groups, %d rows removed", threshold, groups["group"].nunique(),
             removed)
    return {"threshold": threshold, "groups": int(groups["group"].nunique()), "removed": removed}


def drop_near_duplicates(index: SearchIndex, scores: np.ndarray, ids: np.ndarray,
                         threshold: float = CLIP_RETRIEVAL_THRESHOLD) -> tuple[np.ndarray, np.ndarray]:
    """One query's results `[k]` (or `[1, k]`, best first) without near-duplicates of a better-ranked result."""
    threshold = check_threshold(threshold)
    s, i = np.asarray(scores).reshape(-1), np.asarray(ids, np.int64).reshape(-1)
    valid = np.flatnonzero(i >= 0)
    if valid.size > 1:
        x = stored_vectors(index, i[valid])
        flat = faiss.IndexFlatIP(x.shape[1])
        flat.add(x)
        lims, _, hits = flat.range_search(x, threshold)
        a = np.repeat(np.arange(valid.size), np.diff(lims).astype(np.int64))
        label = components(valid.size, np.stack([a, hits], 1)[hits != a])
        valid = valid[label == np.arange(valid.size)]
    return s[valid][None, :], i[valid][None, :]
