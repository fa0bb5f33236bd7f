"""PNG figures: retrieval grids, few-shot curves, loss curves, contact sheets of ranked candidates.

The charts use matplotlib's object API (`Figure` renders through Agg when saved), so nothing needs a
display and no pyplot global state or backend switch leaks into the caller. Contact sheets are drawn
with PIL at exact pixel sizes (`sheet_size`). Every file is written atomically.
"""
from __future__ import annotations

import math
import os
import textwrap
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

from ..errors import ImageLoadError
from ..fileio import atomic_path
from ..model.transforms import load_image

PathLike = Union[str, os.PathLike]
THUMB = 128  # retrieval-grid thumbnail side in pixels
PAD, LABEL_H, TITLE_H = 8, 22, 32  # contact sheet layout (pixels)
TILE_BG, SHEET_BG = (235, 235, 235), (255, 255, 255)  # contact sheet colours


def _save(fig: Figure, out_png: PathLike, dpi: int = 100) -> None:
    with atomic_path(out_png) as tmp, warnings.catch_warnings():
        # Hangul queries lack glyphs unless a CJK font is installed (Debian: fonts-noto-cjk); they
        # render as boxes, and the HTML report carries the text itself.
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        fig.savefig(tmp, format="png", dpi=dpi)


def _tight(fig: Figure) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        fig.tight_layout()


def _thumbnail(path: str) -> Optional[np.ndarray]:
    """An RGB thumbnail `[h, w, 3]`, or None if the file cannot be read."""
    try:
        img = load_image(path)
    except ImageLoadError:
        return None
    img.thumbnail((THUMB, THUMB))
    return np.asarray(img)


def plot_retrieval_grid(
    queries: Sequence[str], results: Sequence[Sequence[tuple[str, float]]], out_png: PathLike
) -> None:
    """One row per query: its retrieved images left to right, each titled with its score."""
    if len(queries) != len(results) or not queries:
        raise ValueError(f"need one result list per query; got {len(queries)} queries, {len(results)} result lists")
    cols = max(1, max(len(r) for r in results))
    fig = Figure(figsize=(1.6 * cols + 2.2, 1.8 * len(queries)))
    axes = np.asarray(fig.subplots(len(queries), cols, squeeze=False))  # [rows, cols]
    for row, (query, hits) in enumerate(zip(queries, results)):
        for col in range(cols):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            if col < len(hits):
                _draw_hit(ax, *hits[col][:2])
            else:
                ax.axis("off")
        axes[row, 0].set_ylabel(textwrap.fill(str(query), 24), rotation=0, ha="right", va="center", fontsize=8)
    _tight(fig)
    _save(fig, out_png)


def _draw_hit(ax, path: str, score: float) -> None:
    thumb = _thumbnail(path)
    if thumb is None:
        ax.text(0.5, 0.5, "unreadable", ha="center", va="center", fontsize=7, transform=ax.transAxes)
    else:
        ax.imshow(thumb)
    ax.set_title(f"{score:.3f}", fontsize=8)


def plot_few_shot(summary_df: pd.DataFrame, out_png: PathLike, chance: Optional[float] = None) -> None:
    """Top-1 vs shots per class (log2 x) per method with a std band; zero-shot and chance as horizontal lines.

    `summary_df` is `summarise_few_shot`'s output (k, method, mean, std); a `chance` column is used
    when the argument is not given.
    """
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for method, part in summary_df.sort_values("k").groupby("method", sort=True):
        if method == "zero_shot":
            ax.axhline(part["mean"].iloc[0], color="black", linestyle="--", label="zero-shot")
            continue
        (line,) = ax.plot(part["k"], part["mean"], marker="o", label=method)
        lo, hi = (part["mean"] - part["std"]).clip(0, 1), (part["mean"] + part["std"]).clip(0, 1)
        ax.fill_between(part["k"], lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
    if chance is None and "chance" in summary_df:
        chance = float(summary_df["chance"].iloc[0])
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle=":", label="chance")
    ax.set_xscale("log", base=2)
    ks = sorted(summary_df["k"].unique())
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("shots per class")
    ax.set_ylabel("top-1 accuracy")
    ax.legend(fontsize=8)
    _tight(fig)
    _save(fig, out_png)


def plot_loss_curve(
    steps: Sequence[float],
    losses: Sequence[float],
    out_png: PathLike,
    val: Optional[tuple[Sequence[float], Sequence[float]]] = None,
) -> None:
    """Training loss vs step, with validation loss `(steps, losses)` as points when given."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.plot(steps, losses, label="train", linewidth=1, marker="." if len(steps) < 30 else None)
    if val is not None and len(val[0]):
        ax.plot(val[0], val[1], marker="o", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
    _tight(fig)
    _save(fig, out_png)


def plot_tradeoff(x: Sequence[float], y: Sequence[float], labels: Sequence[str], out_png: PathLike, *,
                  xlabel: str, ylabel: str, title: str = "") -> None:
    """A line through labelled points, e.g. WiSE-FT: reference-domain score vs new-domain score per mixing weight."""
    fig = Figure(figsize=(5, 4))
    ax = fig.subplots()
    ax.plot(x, y, marker="o", linewidth=1)
    for xi, yi, label in zip(x, y, labels):
        ax.annotate(label, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    _tight(fig)
    _save(fig, out_png)


# --- contact sheets (PIL) ------------------------------------------------------------------------------


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


def contact_sheet(ranked: Sequence[Any], out_png: PathLike, *, prompt: str, tile: int = 160, cols: int = 4) -> Path:
    """A PNG grid of ranked candidates (`clipkit.evaluate.RankedImage`: `.image`, `.rank`, `.score`), left to
    right in the given order with "#rank  score" under each (NaN: "failed") and the prompt as title."""
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
