"""Style augmentation of a training batch: clipkit's batched `StyleAugment` against the same augmentation one
image at a time and against torchvision's v2 pipeline of the nearest transforms, one process, interleaved rounds.

Every runner draws each sample under its own seed, as the training loader does (`seeded_cpu_rng`). The images
are 64 px drawings on white (the demo's cache size); `--images DIR` reads PNGs from a folder instead.

    python benchmarks/bench_augment.py                      # ~1 minute on 2 CPU cores
    python benchmarks/bench_augment.py --images demo/data/images --batches 20
"""
from __future__ import annotations

import argparse
import platform
import statistics
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import default_collate
from torchvision.transforms import v2 as T

from clipkit.data.augment import StyleAugment, StyleAugmentConfig
from clipkit.data.samples import seeded_cpu_rng

from bench_embed import interleaved  # the timing loop of this folder's scripts

SIZE = 64


def drawings(n: int) -> list[torch.Tensor]:
    """`n` uint8 [3, 64, 64] drawings: a coloured disc and box with a white detail, on white."""
    rng, out = np.random.default_rng(0), []
    for _ in range(n):
        img = Image.new("RGB", (SIZE, SIZE), "white")
        d = ImageDraw.Draw(img)
        a, b = rng.integers(2, 20, 2)
        d.ellipse((a, b, SIZE - 1 - b, SIZE - 1 - a), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        d.rectangle((20, 24, 34, 30), fill="white")
        d.rectangle((30, 36, 50, 52), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        out.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1))
    return out


def read_pngs(folder: Path, n: int) -> list[torch.Tensor]:
    paths = sorted(folder.rglob("*.png"))[:n]
    return [torch.from_numpy(np.asarray(Image.open(p).convert("RGB").resize((SIZE, SIZE))).copy()).permute(2, 0, 1)
            for p in paths]


def runners(images: list[torch.Tensor], batch: int) -> dict[str, Callable[[], None]]:
    aug, cfg = StyleAugment(SIZE), StyleAugmentConfig()
    vision = T.Compose([T.RandomApply([T.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)],
                                      p=cfg.jitter_p),
                        T.RandomGrayscale(cfg.grayscale_p),
                        T.RandomApply([T.GaussianBlur(3, cfg.blur_sigma)], p=cfg.blur_p),
                        T.RandomResizedCrop(SIZE, scale=cfg.crop_scale, ratio=cfg.crop_ratio, antialias=True),
                        T.ToDtype(torch.float32, scale=True)])
    batches = [list(range(i, i + batch)) for i in range(0, len(images) - batch + 1, batch)]

    def batched() -> None:
        for rows in batches:
            draws = []
            for r in rows:
                with seeded_cpu_rng(r):
                    draws.append(aug.draw(images[r], key=r))
            aug.apply(torch.stack([images[r] for r in rows]), default_collate(draws))

    def one_by_one(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            for rows in batches:
                out = []
                for r in rows:
                    with seeded_cpu_rng(r):
                        out.append(fn(images[r]))
                torch.stack(out)
        return run

    return {"clipkit batched": batched, "clipkit one image at a time": one_by_one(aug),
            "torchvision v2, one image at a time (no background recolour)": one_by_one(vision)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=Path, help="a folder of PNGs (default: generated drawings)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the training loader's augmentation "
                   "shares the process with the model's step)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    n = args.batch * args.batches
    images = read_pngs(args.images, n) if args.images else drawings(n)
    times = interleaved(runners(images, args.batch), args.rounds)
    print(f"# bench_augment: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} thread(s), {len(images)} images of {SIZE} px in batches of {args.batch}, "
          f"{args.rounds} interleaved rounds\n")
    print("| runner | ms per batch (median) | min s | median s | max s | its time / clipkit batched, min / median / max |")
    print("|---|---|---|---|---|---|")
    base = times["clipkit batched"]
    for name, t in times.items():
        ratios = [a / b for a, b in zip(t, base)]
        rel = "" if name == "clipkit batched" else \
            f"{min(ratios):.2f}x / {statistics.median(ratios):.2f}x / {max(ratios):.2f}x"
        print(f"| {name} | {1e3 * statistics.median(t) / args.batches:.1f} | {min(t):.2f} | "
              f"{statistics.median(t):.2f} | {max(t):.2f} | {rel} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
