"""The README's main job. For now a smoke run of the whole model path on generated images.

It builds a fresh `tiny` model, saves and reloads it in the clipkit format, embeds a few generated
images and captions, and reports the similarity matrix. The model is untrained, so the numbers
show the plumbing works, not that the model has learned anything.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageDraw

SHAPES = {
    "a red circle": ("ellipse", (220, 30, 30)),
    "a green square": ("rectangle", (30, 180, 60)),
    "a blue triangle": ("triangle", (40, 70, 220)),
    "a yellow circle": ("ellipse", (240, 210, 20)),
}


@dataclass
class SmokeResult:
    """Captions, image paths and the `[images, captions]` cosine-similarity matrix of the smoke run."""

    captions: list[str]
    images: list[Path]
    similarity: np.ndarray
    model_dir: Path
    roundtrip_max_abs: float = field(default=0.0)

    def table(self) -> str:
        head = "| image \\ caption | " + " | ".join(self.captions) + " |"
        rule = "|" + "---|" * (len(self.captions) + 1)
        rows = [f"| {p.name} | " + " | ".join(f"{s:+.3f}" for s in row) + " |"
                for p, row in zip(self.images, self.similarity)]
        note = f"\nsave -> load round trip: max abs embedding difference {self.roundtrip_max_abs:.1e}"
        return "\n".join([head, rule, *rows]) + note


def draw_shape(kind: str, colour: tuple[int, int, int], size: int = 96) -> Image.Image:
    img = Image.new("RGB", (size, size), "white")
    box = (size // 6, size // 6, size - size // 6, size - size // 6)
    draw = ImageDraw.Draw(img)
    if kind == "triangle":
        draw.polygon([(size // 2, box[1]), (box[2], box[3]), (box[0], box[3])], fill=colour)
    else:
        getattr(draw, kind)(box, fill=colour)
    return img


def run_smoke(out: Union[str, os.PathLike], seed: int = 0) -> SmokeResult:
    """Fresh tiny model -> save -> load -> embed generated images and captions -> similarities."""
    from .checkpoint import load, save
    from .embed import Embedder
    from .factory import create_model_and_tokenizer

    torch.manual_seed(seed)
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    paths = []
    for caption, (kind, colour) in SHAPES.items():
        paths.append(out / "images" / f"{caption.replace(' ', '_')}.png")
        draw_shape(kind, colour).save(paths[-1])
    model, tok = create_model_and_tokenizer("tiny")
    model_dir = save(model.eval(), tok, out / "model")
    embedder = Embedder(model_dir, device="cpu", progress=False)
    z_img, z_txt = embedder.images(paths), embedder.texts(list(SHAPES))
    fresh = Embedder(model, preprocess=embedder.preprocess, tokenizer=tok, device="cpu", progress=False)
    diff = float(np.abs(fresh.images(paths) - z_img).max())
    return SmokeResult(list(SHAPES), paths, z_img @ z_txt.T, model_dir, diff)
