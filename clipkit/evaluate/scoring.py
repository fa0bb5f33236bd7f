"""Scoring text-to-image samples: CLIPScore, RefCLIPScore, R-precision, and best-of-N reranking.

CLIPScore follows Hessel et al. 2021: per pair `w * max(cos(image, text), 0)` with `w = 2.5`, averaged
over pairs; `prefix=REFERENCE_PREFIX` reproduces the reference code's "A photo depicts " caption prefix.
torchmetrics' `CLIPScore` reports `100 * cos` and clamps at 0 only after averaging over the batch, so
its numbers are not comparable with this per-pair `2.5 * max(cos, 0)` mean (nor with each other
across batch sizes when some cosines are negative).

Rows never shift: an image that fails to load gives NaN in its own row and is counted, not dropped
(so a table's rows stay aligned with their scores).
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Optional, Protocol, Sequence

import numpy as np
import pandas as pd

from ..errors import ImageLoadError
from ..fileio import json_safe
from .zeroshot import zero_shot_weights

log = logging.getLogger(__name__)

REFERENCE_PREFIX = "A photo depicts "  # Hessel et al.'s clipscore.py prepends this to every caption


class EmbedderLike(Protocol):
    """What scoring needs from `clipkit.Embedder`: unit-row `[N, D]` arrays and the last `failures`."""

    failures: list[tuple[int, ImageLoadError]]

    def images(self, items: Sequence[Any], on_error: str = "raise") -> np.ndarray: ...

    def texts(self, strings: Sequence[str]) -> np.ndarray: ...


# --- CLIPScore --------------------------------------------------------------------------------------


def _check_pairs(prompts: Sequence[str], images: Sequence[Any]) -> None:
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not a single string")
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} images: pairs must align row by row")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):  # a pandas NaN caption would otherwise be embedded as the text "nan"
            raise ValueError(f"prompt in row {i} is {p!r}, not a string")


def _with_prefix(texts: Sequence[str], prefix: Optional[str]) -> list[str]:
    """Prepend `prefix` (plus a space if it lacks one, as the reference code does)."""
    if not prefix:
        return list(texts)
    prefix = prefix if prefix[-1].isspace() else prefix + " "
    return [prefix + t for t in texts]


def _embed_pairs(
    embedder: EmbedderLike, prompts: Sequence[str], images: Sequence[Any], prefix: Optional[str], on_error: str
) -> tuple[np.ndarray, np.ndarray]:
    """`([N, D] images, [N, D] prompts)`; NaN image rows where loading failed."""
    _check_pairs(prompts, images)
    return embedder.images(images, on_error=on_error), embedder.texts(_with_prefix(prompts, prefix))


def _clip_s(img: np.ndarray, txt: np.ndarray, w: float) -> np.ndarray:
    cos = np.sum(img * txt, axis=1)  # [N, D] x [N, D] -> [N]
    return (w * np.maximum(cos, 0.0)).astype(np.float32)  # np.maximum keeps NaN


def clip_score(
    embedder: EmbedderLike,
    prompts: list[str],
    images: list,
    *,
    w: float = 2.5,
    prefix: Optional[str] = None,
    on_error: str = "nan",
) -> np.ndarray:
    """`[N]` CLIPScore `w * max(cos, 0)` of each (prompt, image) pair; NaN in the row of a failed image."""
    return _clip_s(*_embed_pairs(embedder, prompts, images, prefix, on_error), w)


def _max_ref_cosines(embedder: EmbedderLike, cand: np.ndarray, references: Sequence[Sequence[str]], prefix: Optional[str]) -> np.ndarray:
    """`[N]` max over each row's references of cos(candidate, reference); all references embedded once."""
    for i, refs in enumerate(references):
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(f"references in row {i} must be a non-empty list of strings")
    flat = [r for refs in references for r in refs]
    emb = embedder.texts(_with_prefix(flat, prefix))
    bounds = np.cumsum([0] + [len(refs) for refs in references])
    return np.array([np.max(emb[a:b] @ c) for c, a, b in zip(cand, bounds[:-1], bounds[1:])], np.float32)


def ref_clip_score(
    embedder: EmbedderLike,
    prompts: list[str],
    images: list,
    references: list[list[str]],
    *,
    w: float = 2.5,
    prefix: Optional[str] = None,
    on_error: str = "nan",
) -> np.ndarray:
    """`[N]` RefCLIPScore (Hessel et al. eq. 2): H-Mean(CLIP-S(c, v), max(max_r cos(c, r), 0)).

    `c` is the candidate text (the prompt), `v` its image, `r` runs over that row's reference captions;
    the image is not compared with the references. The harmonic mean of two zeros is 0; NaN rows stay NaN.
    """
    if len(references) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(references)} reference lists")
    img, cand = _embed_pairs(embedder, prompts, images, prefix, on_error)
    clip_s = _clip_s(img, cand, w)
    ref_s = np.maximum(_max_ref_cosines(embedder, cand, references, prefix), 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        h = 2 * clip_s * ref_s / (clip_s + ref_s)
    return np.where((clip_s == 0) | (ref_s == 0), 0.0, h).astype(np.float32)


# --- summaries ---------------------------------------------------------------------------------------


def bootstrap_ci(values: Sequence[float] | np.ndarray, n_boot: int = 1000, ci: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean over the non-NaN values (NaN if none)."""
    v = np.asarray(values, np.float64)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    chunk = max(1, 4_000_000 // v.size)  # bounds the [chunk, n] index matrix
    means = np.concatenate([
        v[rng.integers(0, v.size, (min(chunk, n_boot - s), v.size))].mean(axis=1) for s in range(0, n_boot, chunk)
    ])
    alpha = (1 - ci) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(low), float(high)


def summarise_scores(scores: Sequence[float] | np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Mean CLIPScore with a 95 % bootstrap CI; `n` counts scored pairs, `n_failed` NaN rows (JSON-safe)."""
    s = np.asarray(scores, np.float64)
    ok = s[~np.isnan(s)]
    low, high = bootstrap_ci(ok, n_boot=n_boot, seed=seed)
    return {
        "clipscore_mean": json_safe(float(ok.mean())) if ok.size else None,
        "clipscore_ci_low": json_safe(low),
        "clipscore_ci_high": json_safe(high),
        "n": int(ok.size),
        "n_failed": int(s.size - ok.size),
    }


# --- R-precision -------------------------------------------------------------------------------------


def _draw_distractors(prompt_ids: np.ndarray, num_prompts: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """`[N, k]` distinct prompt ids per row, none equal to that row's own id."""
    out = np.empty((len(prompt_ids), k), np.int64)
    for i, own in enumerate(prompt_ids):
        d = rng.choice(num_prompts - 1, k, replace=False)
        out[i] = d + (d >= own)  # skip over the own id
    return out


def r_precision_from_embeddings(
    img_emb: np.ndarray, prompt_emb: np.ndarray, prompt_ids: Sequence[int], R: int = 100, seed: int = 0
) -> dict[str, Any]:
    """R-precision from arrays: image i (row of `img_emb`) must rank `prompt_emb[prompt_ids[i]]` first
    among it and R-1 other distinct prompts drawn with `seed`. Ties count as misses; NaN rows are skipped."""
    ids = np.asarray(prompt_ids, np.int64)
    if len(ids) != len(img_emb):
        raise ValueError(f"{len(img_emb)} images but {len(ids)} prompt ids")
    if R < 2 or R > len(prompt_emb):
        raise ValueError(f"R={R} needs at least {R} distinct prompts (got {len(prompt_emb)}) and R >= 2")
    ok = ~np.isnan(img_emb).any(axis=1)
    idx = np.flatnonzero(ok)
    distract = _draw_distractors(ids[idx], len(prompt_emb), R - 1, np.random.default_rng(seed))
    hits = np.zeros(len(idx), bool)
    step = max(1, 4_000_000 // len(prompt_emb))
    for s in range(0, len(idx), step):
        sims = img_emb[idx[s : s + step]] @ prompt_emb.T  # [b, D] x [D, K] -> [b, K]
        rows = np.arange(len(sims))[:, None]
        own = sims[rows[:, 0], ids[idx[s : s + step]]]
        hits[s : s + step] = own > sims[rows, distract[s : s + step]].max(axis=1)  # strict: ties lose
    return {
        "r_precision": float(hits.mean()) if hits.size else None,
        "R": R,
        "chance_r_precision": 1.0 / R,
        "n": int(hits.size),
        "n_failed": int((~ok).sum()),
    }


def r_precision(
    embedder: EmbedderLike,
    prompts: list[str],
    images: list,
    *,
    R: int = 100,
    num_distractors: Optional[int] = None,
    seed: int = 0,
) -> dict[str, Any]:
    """R-precision of generated images against their prompts (AttnGAN/DALL-E protocol, R candidates).

    `num_distractors` (default R-1) overrides the pool: R becomes num_distractors + 1. Distractors come
    from the other distinct prompts of `prompts`; failed images are excluded and counted in `n_failed`.
    """
    _check_pairs(prompts, images)
    R = R if num_distractors is None else num_distractors + 1
    distinct = list(dict.fromkeys(prompts))
    if R > len(distinct):
        raise ValueError(f"R={R} needs {R - 1} distractors but only {len(distinct) - 1} other distinct prompts exist")
    position = {p: i for i, p in enumerate(distinct)}
    img = embedder.images(images, on_error="nan")
    return r_precision_from_embeddings(img, embedder.texts(distinct), [position[p] for p in prompts], R, seed)


# --- best-of-N reranking -------------------------------------------------------------------------------


@dataclass
class RankedImage:
    """One candidate in a reranking: the input item, its score (NaN if it failed), 1-based rank, failure reason."""

    image: Any
    score: float
    rank: int
    error: Optional[str] = None


def _text_query(embedder: EmbedderLike, texts: Sequence[str], templates: Optional[Sequence[str]]) -> np.ndarray:
    """`[P, D]` unit query per text: the prompt ensemble over `templates` (each with one `{}`), if given."""
    return zero_shot_weights(embedder.texts, texts, templates) if templates else embedder.texts(list(texts))


def _rank(items: Sequence[Any], scores: np.ndarray, errors: dict[int, str], top: Optional[int]) -> list[RankedImage]:
    """Sort best first (stable for ties), failed (NaN) last."""
    failed = np.isnan(scores)
    order = sorted(range(len(items)), key=lambda i: (failed[i], 0.0 if failed[i] else -scores[i]))
    ranked = [RankedImage(items[i], float(scores[i]), r, errors.get(i)) for r, i in enumerate(order, 1)]
    return ranked[:top] if top is not None else ranked


def _scores(img: np.ndarray, query: np.ndarray, negative: Optional[np.ndarray], negative_weight: float) -> np.ndarray:
    s = img @ query  # [N, D] x [D] -> [N]
    return s - negative_weight * (img @ negative) if negative is not None else s


def _embed_candidates(embedder: EmbedderLike, images: Sequence[Any]) -> tuple[np.ndarray, dict[int, str]]:
    img = embedder.images(images, on_error="nan")
    errors = {i: str(e) for i, e in embedder.failures}
    if errors:
        log.warning("%d of %d candidate images failed to load; ranked last with score NaN", len(errors), len(images))
    return img, errors


def rerank(
    embedder: EmbedderLike,
    prompt: str,
    images: list,
    *,
    templates: Optional[list[str]] = None,
    negative_prompt: Optional[str] = None,
    negative_weight: float = 1.0,
    top: Optional[int] = None,
) -> list[RankedImage]:
    """Best-of-N: rank candidates by cos(image, prompt) minus `negative_weight` * cos(image, negative prompt).

    Templates (e.g. `["{}", "a picture of {}"]`) apply to the prompt and the negative prompt alike.
    Failed images come last with score NaN and their reason in `.error`; `top` keeps the first `top`.
    """
    img, errors = _embed_candidates(embedder, images)
    texts = [prompt] + ([negative_prompt] if negative_prompt is not None else [])
    q = _text_query(embedder, texts, templates)
    neg = q[1] if negative_prompt is not None else None
    return _rank(images, _scores(img, q[0], neg, negative_weight), errors, top)


def rerank_table(
    embedder: EmbedderLike,
    table: pd.DataFrame,
    prompt_column: str = "prompt",
    image_column: str = "image",
    *,
    templates: Optional[list[str]] = None,
    negative_prompt: Optional[str] = None,
    negative_weight: float = 1.0,
    top: Optional[int] = None,
) -> dict[str, list[RankedImage]]:
    """Rerank every prompt's candidates in a (prompt, image) table; all images and prompts embedded once."""
    missing = [c for c in (prompt_column, image_column) if c not in table.columns]
    if missing:
        raise ValueError(f"table lacks column(s) {missing}; available: {list(table.columns)}")
    if table[prompt_column].isna().any():
        raise ValueError(f"{int(table[prompt_column].isna().sum())} rows have no {prompt_column!r}")
    prompts = table[prompt_column].astype(str)
    items = table[image_column].tolist()
    img, errors = _embed_candidates(embedder, items)
    distinct = list(dict.fromkeys(prompts))
    texts = distinct + ([negative_prompt] if negative_prompt is not None else [])
    q = _text_query(embedder, texts, templates)
    neg = q[-1] if negative_prompt is not None else None
    groups = prompts.groupby(prompts, sort=False).indices
    out = {}
    for p, qi in zip(distinct, q):
        rows = groups[p]
        sub_err = {j: errors[r] for j, r in enumerate(rows) if r in errors}
        out[p] = _rank([items[r] for r in rows], _scores(img[rows], qi, neg, negative_weight), sub_err, top)
    return out


def ranking_json(prompt: str, ranked: Sequence[RankedImage]) -> dict[str, Any]:
    """`{"prompt", "ranking": [{"image", "score"}, ...]}` best first; NaN scores become null."""
    def item(r: RankedImage) -> dict[str, Any]:
        src = os.fspath(r.image) if isinstance(r.image, (str, os.PathLike)) else None  # in-memory: null
        d = {"image": src, "score": json_safe(r.score)}
        return d if r.error is None else {**d, "error": r.error}

    return {"prompt": prompt, "ranking": [item(r) for r in sorted(ranked, key=lambda r: r.rank)]}
