"""Evaluation tasks built from a labelled table: best-of-N candidate selection (reranking).

For each prompt (a caption), the candidates are its own image plus N-1 distractor images from the
same label (e.g. the same emoji subcategory), so the reranker has to read the prompt, not just the
category. EVERY candidate is degraded the same way (generator samples are all imperfect): degrading
only the target would let a model win or lose by image quality alone. Chance is 1/N.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import pandas as pd
from PIL import Image, ImageEnhance, ImageFilter

from ..model.transforms import load_image

PathLike = Union[str, os.PathLike]


@dataclass
class CandidateSet:
    """One prompt, its candidate image paths, and which candidate is the prompt's own image."""

    prompt: str
    candidates: list[str]
    target: int


def degrade(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A generator-like imperfect copy: random crop, slight blur, colour and contrast shifts."""
    w, h = img.size
    s = rng.uniform(0.75, 0.95)
    cw, ch = int(w * s), int(h * s)
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    out = img.crop((x, y, x + cw, y + ch)).resize((w, h), Image.Resampling.BICUBIC)
    out = out.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.2))))
    out = ImageEnhance.Color(out).enhance(float(rng.uniform(0.6, 1.4)))
    return ImageEnhance.Contrast(out).enhance(float(rng.uniform(0.7, 1.3)))


def best_of_n_task(
    table: pd.DataFrame, out_dir: PathLike, *, n: int = 8, num_prompts: int = 100, label_column: str = "label",
    seed: int = 0,
) -> list[CandidateSet]:
    """Build up to `num_prompts` candidate sets of size `n`; degraded copies of all candidates go to `out_dir`.

    Rows whose label has fewer than `n` distinct images are not used as prompts. Deterministic for a seed.
    """
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images_by_label = table.groupby(label_column)["image"].agg(lambda s: sorted(set(s)))
    usable = table[table[label_column].map(lambda lab: len(images_by_label[lab]) >= n)]
    usable = usable.drop_duplicates("image")
    rows = usable.iloc[rng.permutation(len(usable))[:num_prompts]]
    sets = []
    for i, row in enumerate(rows.itertuples(index=False)):
        own = getattr(row, "image")
        pool = [p for p in images_by_label[getattr(row, label_column)] if p != own]
        sources = [pool[j] for j in rng.choice(len(pool), size=n - 1, replace=False)] + [own]
        order = rng.permutation(n)  # the target (last source) lands at position where(order == n - 1)
        candidates = []
        for slot, j in enumerate(order):
            copy = out / f"prompt{i:04d}_cand{slot}.png"
            degrade(load_image(sources[j]), rng).save(copy)
            candidates.append(str(copy))
        sets.append(CandidateSet(getattr(row, "caption"), candidates, int(np.where(order == n - 1)[0][0])))
    return sets


def best_of_n_accuracy(rankings: Sequence[Sequence[Any]], sets: Sequence[CandidateSet]) -> dict[str, float]:
    """Top-1 accuracy of rankings (lists of candidate paths, best first) against each set's target."""
    hits = [str(r[0]) == s.candidates[s.target] for r, s in zip(rankings, sets)]
    n = len(sets[0].candidates) if sets else 0
    return {"best_of_n_top1": float(np.mean(hits)) if hits else float("nan"), "n_candidates": n,
            "chance_best_of_n_top1": 1.0 / n if n else float("nan"), "num_prompts": len(sets)}
