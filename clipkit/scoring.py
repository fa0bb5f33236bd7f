"""Scoring text-to-image samples: CLIPScore, RefCLIPScore, R-precision, and best-of-N reranking.

CLIPScore follows Hessel et al. 2021: per pair `w * max(cos(image, text), 0)` with `w = 2.5`, averaged
over pairs; `prefix=REFERENCE_PREFIX` reproduces the reference code's "A photo depicts " caption prefix.
torchmetrics' `CLIPScore` reports `100 * cos` and clamps at 0 only after averaging over the batch, so
its numbers are not comparable with this per-pair `2.5 * max(cos, 0)` mean (nor with each other
across batch sizes when some cosines are negative).

Rows never shift: an image that fails to load gives NaN in its own row and is counted, not dropped
(RELIABILITY case 15).
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from .errors import ImageLoadError
from .fileio import atomic_path, json_safe, write_json_atomic
from .transforms import load_image

log = logging.getLogger(__name__)

REFERENCE_PREFIX = "A photo depicts "  # Hessel et al.'s clipscore.py prepends this to every caption
PAD, LABEL_H, TITLE_H = 8, 22, 32  # contact sheet layout (pixels)
TILE_BG, SHEET_BG = (235, 235, 235), (255, 255, 255)


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
        "chance": 1.0 / R,
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
    """`[P, D]` unit query per text: the normalised mean over `templates` (each with one `{}`), if given."""
    if not templates:
        return embedder.texts(list(texts))
    emb = embedder.texts([t.format(x) for x in texts for t in templates])
    mean = emb.reshape(len(texts), len(templates), -1).mean(axis=1)  # [P*T, D] -> [P, D]
    return (mean / np.linalg.norm(mean, axis=1, keepdims=True)).astype(np.float32)


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
    prompt_col: str = "prompt",
    image_col: str = "image",
    *,
    templates: Optional[list[str]] = None,
    negative_prompt: Optional[str] = None,
    negative_weight: float = 1.0,
    top: Optional[int] = None,
) -> dict[str, list[RankedImage]]:
    """Rerank every prompt's candidates in a (prompt, image) table; all images and prompts embedded once."""
    missing = [c for c in (prompt_col, image_col) if c not in table.columns]
    if missing:
        raise ValueError(f"table lacks column(s) {missing}; available: {list(table.columns)}")
    if table[prompt_col].isna().any():
        raise ValueError(f"{int(table[prompt_col].isna().sum())} rows have no {prompt_col!r}")
    items = table[image_col].tolist()
    img, errors = _embed_candidates(embedder, items)
    distinct = list(dict.fromkeys(table[prompt_col].astype(str)))
    texts = distinct + ([negative_prompt] if negative_prompt is not None else [])
    q = _text_query(embedder, texts, templates)
    neg = q[-1] if negative_prompt is not None else None
    groups = table.groupby(table[prompt_col].astype(str), sort=False).indices
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


# --- contact sheet -----------------------------------------------------------------------------------


def sheet_size(n: int, tile: int = 160, cols: int = 4) -> tuple[int, int]:
    """Pixel size `(width, height)` of a contact sheet of `n` candidates."""
    ncols = min(cols, n)
    nrows = math.ceil(n / ncols)
    return PAD + ncols * (tile + PAD), TITLE_H + nrows * (tile + LABEL_H + PAD) + PAD


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> str:
    """`text`, cut with an ellipsis so it fits in `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def _tile(item: Any, tile: int) -> Optional[Image.Image]:
    """The candidate letterboxed onto a `tile` square (transparency on the tile colour); None if unreadable."""
    try:
        img = load_image(item, background=TILE_BG)
    except ImageLoadError:
        return None
    s = tile / max(img.size)  # resize() returns a new image, so a caller's PIL image is never touched
    img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.Resampling.LANCZOS)
    out = Image.new("RGB", (tile, tile), TILE_BG)
    out.paste(img, ((tile - img.width) // 2, (tile - img.height) // 2))
    return out


def contact_sheet(ranked: Sequence[RankedImage], out_png: str | os.PathLike, *, prompt: str, tile: int = 160, cols: int = 4) -> Path:
    """Write a PNG grid of the ranked candidates, "#rank  score" under each, the prompt as title (atomic)."""
    if not ranked:
        raise ValueError("no candidates to draw")
    sheet = Image.new("RGB", sheet_size(len(ranked), tile, cols), SHEET_BG)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=14)
    draw.text((PAD, PAD), _fit_text(draw, prompt, font, sheet.width - 2 * PAD), fill=(0, 0, 0), font=font)
    ncols = min(cols, len(ranked))
    for k, r in enumerate(ranked):
        x = PAD + (k % ncols) * (tile + PAD)
        y = TITLE_H + (k // ncols) * (tile + LABEL_H + PAD)
        img = _tile(r.image, tile)
        if img is None:
            draw.rectangle((x, y, x + tile - 1, y + tile - 1), fill=TILE_BG, outline=(200, 0, 0))
        else:
            sheet.paste(img, (x, y))
        label = f"#{r.rank}  " + ("failed" if math.isnan(r.score) else f"{r.score:.4f}")
        draw.text((x, y + tile + 4), _fit_text(draw, label, font, tile), fill=(0, 0, 0), font=font)
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        sheet.save(tmp, format="PNG")
    return out_png


# --- runners behind `clipkit score` / `clipkit rerank` ------------------------------------------------

def _embedder(model: Any, resize_mode: Optional[str] = None) -> Any:
    """An Embedder for a model path (or a copy of the given one); `resize_mode="longest"` letterboxes odd sizes."""
    import copy
    from dataclasses import replace

    from .embed import Embedder
    from .transforms import Preprocess

    embedder = model if hasattr(model, "texts") else Embedder(model)
    if resize_mode is not None:
        embedder = copy.copy(embedder)  # never change the caller's embedder
        embedder.preprocess = Preprocess(replace(embedder.preprocess.cfg, resize_mode=resize_mode))
    return embedder


def _references(cell: Any) -> list[str]:
    """A references cell: a JSON list of captions, or captions separated by `|`."""
    import json

    text = str(cell).strip()
    refs = json.loads(text) if text.startswith("[") else text.split("|")
    return [str(r).strip() for r in refs if str(r).strip()]


def score_table(model: Any, pairs: str | os.PathLike, *, prompt_col: str = "prompt", image_col: str = "image",
                prefix: Optional[str] = None, r_precision: Optional[int] = None, reference_col: Optional[str] = None,
                resize_mode: Optional[str] = None, json_out: Optional[str | os.PathLike] = None) -> dict[str, Any]:
    """CLIPScore (RefCLIPScore with references, R-precision on request) of a (prompt, image) table."""
    from .data import read_table

    table = read_table(pairs, image_col=image_col, caption_col=prompt_col)
    embedder = _embedder(model, resize_mode)
    prompts, images = table["caption"].tolist(), table["image"].tolist()
    scores = clip_score(embedder, prompts, images, prefix=prefix)
    summary = {**summarise_scores(scores), "prefix": prefix, "w": 2.5}
    ref = None
    if reference_col:
        if reference_col not in table.columns:
            raise ValueError(f"no column {reference_col!r}; available: {list(table.columns)}")
        ref = ref_clip_score(embedder, prompts, images, [_references(c) for c in table[reference_col]], prefix=prefix)
        summary["refclipscore_mean"] = json_safe(float(np.nanmean(ref))) if np.isfinite(ref).any() else None
    if r_precision:
        rp = globals()["r_precision"](embedder, prompts, images, R=r_precision)
        summary.update({k if k == "r_precision" else f"r_precision_{k}": v for k, v in rp.items()})
    if json_out:
        rows = [{"prompt": p, "image": r, "clipscore": json_safe(s)}
                for p, r, s in zip(prompts, table["image_rel"], scores)]
        for row, v in zip(rows, ref if ref is not None else []):
            row["refclipscore"] = json_safe(v)
        write_json_atomic(json_out, {**summary, "pairs": rows})
    return summary


def rerank_files(model: Any, prompt: str, images: Sequence[str], *, top: Optional[int] = None,
                 templates: Optional[list[str]] = None, negative_prompt: Optional[str] = None,
                 resize_mode: Optional[str] = None, sheet: Optional[str | os.PathLike] = None,
                 json_out: Optional[str | os.PathLike] = None) -> dict[str, Any]:
    """Rank candidate files for a prompt; optionally write the ranking JSON and a contact sheet."""

    embedder = _embedder(model, resize_mode)
    ranked = rerank(embedder, prompt, list(images), templates=templates, negative_prompt=negative_prompt)
    kept = ranked[:top] if top else ranked
    if sheet:
        contact_sheet(kept, sheet, prompt=prompt)
    result = ranking_json(prompt, kept)
    if json_out:
        write_json_atomic(json_out, result)
    return result


def rerank_pairs(model: Any, pairs: str | os.PathLike, *, prompt_col: str = "prompt", image_col: str = "image",
                 top: Optional[int] = None, templates: Optional[list[str]] = None,
                 negative_prompt: Optional[str] = None, resize_mode: Optional[str] = None,
                 sheet_dir: Optional[str | os.PathLike] = None,
                 json_out: Optional[str | os.PathLike] = None) -> list[dict[str, Any]]:
    """Batch best-of-N: a (prompt, image) table grouped by prompt; one ranking (and sheet) per prompt."""
    from .data import read_table

    table = read_table(pairs, image_col=image_col, caption_col=prompt_col).rename(columns={"caption": "prompt"})
    ranked = rerank_table(_embedder(model, resize_mode), table, templates=templates,
                          negative_prompt=negative_prompt, top=None)
    results = []
    for i, (prompt, items) in enumerate(ranked.items()):
        kept = items[:top] if top else items
        if sheet_dir:
            contact_sheet(kept, Path(sheet_dir) / f"prompt{i:04d}.png", prompt=prompt)
        results.append(ranking_json(prompt, kept))
    if json_out:
        write_json_atomic(json_out, results)
    return results
