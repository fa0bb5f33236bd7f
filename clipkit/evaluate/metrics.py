"""Metric functions on arrays: retrieval recall and median rank, classification accuracy, each with its chance.

Ties always count against the model (a tied wrong item ranks above the right one) and NaN scores count
as -inf, so a constant or broken model scores at or below chance, never above.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd
from scipy import sparse

from .fewshot import finite_scores, target_ranks

RETRIEVAL_KS = (1, 5, 10)
CHUNK = 1024  # query rows per similarity block: bounds memory at CHUNK x gallery floats


def _relevance(text_to_image: Any, num_images: int) -> sparse.csr_matrix:
    """`[Nt, Ni]` boolean relevance from one image index per text, or a sequence of index arrays per text."""
    if isinstance(text_to_image, np.ndarray) and text_to_image.ndim == 1 and text_to_image.dtype != object:
        rows, cols = np.arange(len(text_to_image)), np.asarray(text_to_image, np.int64)
    else:
        sets = [np.atleast_1d(np.asarray(x, np.int64)) for x in text_to_image]
        rows, cols = np.repeat(np.arange(len(sets)), [len(x) for x in sets]), np.concatenate(sets or [np.zeros(0, np.int64)])
    if len(rows) and (cols.min() < 0 or cols.max() >= num_images):
        raise ValueError("text_to_image holds an index outside the image rows")
    rel = sparse.csr_matrix((np.ones(len(rows), bool), (rows, cols)), shape=(int(rows.max(initial=-1)) + 1, num_images))
    if rel.shape[0] and (np.diff(rel.indptr) == 0).any():
        raise ValueError("every text needs at least one relevant image")
    return rel


def _best_ranks(queries: np.ndarray, gallery: np.ndarray, rel: sparse.csr_matrix) -> np.ndarray:
    """Per query row: 1 + number of non-relevant gallery items scoring >= its best relevant one (ties pessimistic)."""
    ranks = []
    for i in range(0, len(queries), CHUNK):
        s = finite_scores(queries[i : i + CHUNK] @ gallery.T)  # [B, N]
        mine = rel[i : i + CHUNK].toarray()  # [B, N]
        best = np.where(mine, s, -np.inf).max(1, keepdims=True)  # [B, 1]
        ranks.append(1 + ((s >= best) & ~mine).sum(1))
    return np.concatenate(ranks) if ranks else np.zeros(0, np.int64)


def text_to_image_ranks(image_emb: np.ndarray, text_emb: np.ndarray, text_to_image: Any) -> np.ndarray:
    """Per text query, the 1-based rank of its best relevant image (`text_to_image` as in `retrieval_metrics`;
    ties count against the model): the per-query view behind text->image Recall@k."""
    image_emb, text_emb = np.asarray(image_emb, np.float32), np.asarray(text_emb, np.float32)
    return _best_ranks(text_emb, image_emb, _relevance(text_to_image, len(image_emb)))


def retrieval_metrics(
    image_emb: np.ndarray, text_emb: np.ndarray, text_to_image: Any, ks: Sequence[int] = RETRIEVAL_KS
) -> dict[str, float]:
    """Text->image and image->text Recall@k and median rank (1-based), plus `chance_*` for each.

    `text_to_image[t]` is the image row of caption t, or an array of rows when a caption fits several
    images (identical captions of different images). A text query is right at k if one of its images
    is in its top k; an image query if ANY of its captions is (rank = best among them). Images without
    captions are gallery-only (no i2t query). Ties are pessimistic (see module docstring).
    """
    image_emb, text_emb = np.asarray(image_emb, np.float32), np.asarray(text_emb, np.float32)
    if len(text_to_image) != len(text_emb) or len(text_emb) == 0 or len(image_emb) == 0:
        raise ValueError(f"need >= 1 image and text and one entry per text; got {len(image_emb)} images, "
                         f"{len(text_emb)} texts, {len(text_to_image)} entries")
    rel = _relevance(text_to_image, len(image_emb))  # [Nt, Ni]
    captioned = np.flatnonzero(np.diff(rel.tocsc().indptr) > 0)
    t2i_ranks = text_to_image_ranks(image_emb, text_emb, text_to_image)
    i2t_ranks = _best_ranks(image_emb[captioned], text_emb, rel.T.tocsr()[captioned])
    out: dict[str, float] = {"num_images": len(image_emb), "num_texts": len(text_emb)}
    for name, ranks in (("text_to_image", t2i_ranks), ("image_to_text", i2t_ranks)):
        for k in ks:
            out[f"{name}_R@{k}"] = float(np.mean(ranks <= k))
        out[f"{name}_median_rank"] = float(np.median(ranks))
    out.update({f"chance_{k}": v for k, v in retrieval_chance(len(image_emb), text_to_image, ks).items()})
    return out


def retrieval_chance(num_images: int, text_to_image: Any, ks: Sequence[int] = RETRIEVAL_KS) -> dict[str, float]:
    """What a uniformly random ranking scores, under the same keys as `retrieval_metrics`.

    R@k for a query with m relevant items among n = 1 - C(n - m, k) / C(n, k) (m = 1 for a plain
    caption: k / Ni), averaged over queries. Median ranks: the median of the expected rank (n + 1) / (m + 1).
    """
    rel = _relevance(text_to_image, num_images)
    nt = rel.shape[0]
    m_t = np.diff(rel.indptr)  # relevant images per text
    m_i = np.diff(rel.tocsc().indptr)
    m_i = m_i[m_i > 0]  # captions per captioned image
    out: dict[str, float] = {}
    for name, n, m in (("text_to_image", num_images, m_t), ("image_to_text", nt, m_i)):
        counts = np.unique(m, return_counts=True)
        for k in ks:
            out[f"{name}_R@{k}"] = float(sum(c * _p_any_in_top_k(n, int(mi), k) for mi, c in zip(*counts)) / len(m))
        out[f"{name}_median_rank"] = float(np.median((n + 1) / (m + 1)))
    return out


def _p_any_in_top_k(n: int, m: int, k: int) -> float:
    if k > n - m:
        return 1.0
    return 1.0 - math.exp(sum(math.log((n - m - j) / (n - j)) for j in range(k)))


def classification_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """top1, top5 and balanced accuracy (mean recall over classes present), with chance levels.

    `chance_*` is a uniformly random guess; `majority_top1` is always answering the most common class.
    """
    s, y = np.asarray(scores), np.asarray(labels, np.int64)
    if s.ndim != 2 or len(s) != len(y) or len(y) == 0:
        raise ValueError(f"need scores [N, C] and labels [N] with N >= 1; got {s.shape} and {y.shape}")
    n, c = s.shape
    if y.min() < 0 or y.max() >= c:
        raise ValueError(f"labels must lie in [0, {c})")
    ranks = target_ranks(s, y)  # [N]
    counts = np.bincount(y, minlength=c)
    present = counts > 0
    recall = np.bincount(y, weights=ranks == 1, minlength=c)[present] / counts[present]
    return {
        "top1": float(np.mean(ranks <= 1)),
        "top5": float(np.mean(ranks <= 5)),
        "balanced_accuracy": float(recall.mean()),
        "num_classes": c,
        "num_samples": n,
        "chance_top1": 1.0 / c,
        "chance_top5": min(5, c) / c,
        "chance_balanced_accuracy": 1.0 / c,
        "majority_top1": float(counts.max() / n),
    }


def per_class_table(scores: np.ndarray, labels: np.ndarray, classnames: Optional[Sequence[str]] = None) -> pd.DataFrame:
    """One row per class: n, recall (top-1 accuracy within the class), the class it is most often taken for."""
    s, y = finite_scores(scores), np.asarray(labels, np.int64)
    n_cls = s.shape[1]
    names = [str(x) for x in classnames] if classnames is not None else [str(i) for i in range(n_cls)]
    rival = np.where(np.eye(n_cls, dtype=bool)[y], -np.inf, s).argmax(1)  # best wrong class per sample [N]
    pred = np.where(target_ranks(s, y) == 1, y, rival)  # ties go to the wrong class, as in the metrics
    conf = np.zeros((n_cls, n_cls), np.int64)
    np.add.at(conf, (y, pred), 1)
    n = conf.sum(1)
    off = conf - np.diag(np.diag(conf))
    with np.errstate(invalid="ignore", divide="ignore"):
        recall, confused = np.diag(conf) / n, off.max(1) / n
    return pd.DataFrame({
        "class": names,
        "n": n,
        "recall": recall,
        "most_confused_with": [names[j] if off[i, j] else "" for i, j in enumerate(off.argmax(1))],
        "confused_rate": confused,
    })

