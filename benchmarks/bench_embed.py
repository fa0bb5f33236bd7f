"""Embedding throughput, clipkit against open_clip and transformers, one process, interleaved rounds.

Random-initialised ViT-B-32 shapes in all three libraries (no weights are downloaded). Two workloads:

- images end to end from 640x480 JPEG files (decode + preprocess + image tower), each library with its
  documented defaults: clipkit `Embedder(...).images(paths)` (precision auto, decode thread pool, JPEG draft);
  open_clip `preprocess(Image.open(p))` stacked + `model.encode_image` (fp32 on CPU); transformers
  `CLIPImageProcessor()(images=[Image.open(p)...])` + `model.get_image_features` (fp32).
- 256 short prompts: clipkit `Embedder.texts` (cut at the longest prompt); open_clip `tokenizer(texts)` (pads to 77)
  + `encode_text`; transformers `CLIPTokenizer(..., padding=True)` (dynamic padding) + `get_text_features`.

    python benchmarks/bench_embed.py                 # ~3-4 minutes on 2 CPU cores
    python benchmarks/bench_embed.py --images 16 --rounds 2   # sanity run
"""
from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

CLASSES = ["cat", "dog", "car", "tree", "house", "bird", "apple", "boat", "chair", "flower", "horse", "plane",
           "clock", "shoe", "lamp", "cup"]


def make_jpegs(folder: Path, n: int) -> list[str]:
    """`n` 640x480 JPEGs of smooth random colour fields plus noise (photo-like file sizes)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((640, 480), Image.Resampling.BICUBIC)
        noisy = np.clip(np.asarray(img, np.int16) + rng.integers(-12, 13, (480, 640, 3)), 0, 255).astype(np.uint8)
        path = folder / f"im{i:03d}.jpg"
        Image.fromarray(noisy).save(path, quality=90)
        paths.append(str(path))
    return paths


def prompts(n: int) -> list[str]:
    return [f"a photo of a {CLASSES[i % len(CLASSES)]}." if i % 2 else f"a {CLASSES[i % len(CLASSES)]}"
            for i in range(n)]


def clipkit_embedder(batch: int, precision: str = "auto"):
    import clipkit
    from clipkit.model.transforms import Preprocess

    torch.manual_seed(0)
    model, tok = clipkit.create_model_and_tokenizer("ViT-B-32")
    return clipkit.Embedder(model.eval(), preprocess=Preprocess(model.config.preprocess), tokenizer=tok, device="cpu",
                            batch_size=batch, progress=False, precision=precision)


def build_open_clip() -> tuple:
    import open_clip

    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32")
    return model.eval(), preprocess, open_clip.get_tokenizer("ViT-B-32")


def build_transformers() -> tuple:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from clipkit.model.tokenizer import openai_clip_tokenizer

    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8,
                                      num_hidden_layers=12, max_position_embeddings=77, vocab_size=49408,
                                      hidden_act="quick_gelu"),
                     vision_config=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                        num_hidden_layers=12, image_size=224, patch_size=32, hidden_act="quick_gelu"),
                     projection_dim=512)
    return CLIPModel(cfg).eval(), CLIPImageProcessor(), openai_clip_tokenizer(77).hf


def image_runners(paths: list[str], batch: int, peers: bool = True) -> dict[str, Callable[[], None]]:
    from PIL import Image

    ck = clipkit_embedder(batch)
    oc_model, oc_pre, _ = build_open_clip()
    hf_model, hf_proc, _ = build_transformers()

    @torch.no_grad()
    def open_clip_run() -> None:
        for s in range(0, len(paths), batch):
            x = torch.stack([oc_pre(Image.open(p)) for p in paths[s:s + batch]])
            oc_model.encode_image(x, normalize=True)

    @torch.no_grad()
    def hf_run() -> None:
        for s in range(0, len(paths), batch):
            x = hf_proc(images=[Image.open(p) for p in paths[s:s + batch]], return_tensors="pt")
            hf_model.get_image_features(**x)

    from clipkit.model.precision import autocast

    pixels = torch.stack([ck.preprocess(p) for p in paths])  # decoded once, outside the timing

    @torch.inference_mode()
    def tower_only() -> None:  # what end to end is measured against: the same tower on pre-decoded pixels
        with autocast(ck.precision.image, ck.device):
            for s in range(0, len(paths), batch):
                ck.encoder.encode_image(pixels[s:s + batch])

    runners = {"clipkit": lambda: ck.images(paths), "open_clip": open_clip_run, "transformers": hf_run,
               "clipkit tower only (pre-decoded)": tower_only}
    return runners if peers else {k: runners[k] for k in ("clipkit", "clipkit tower only (pre-decoded)")}


def text_runners(texts: list[str], batch: int) -> dict[str, Callable[[], None]]:
    ck = clipkit_embedder(batch)
    oc_model, _, oc_tok = build_open_clip()
    hf_model, _, hf_tok = build_transformers()

    @torch.no_grad()
    def open_clip_run() -> None:
        for s in range(0, len(texts), batch):
            oc_model.encode_text(oc_tok(texts[s:s + batch]), normalize=True)

    @torch.no_grad()
    def hf_run() -> None:
        for s in range(0, len(texts), batch):
            enc = hf_tok(texts[s:s + batch], padding=True, truncation=True, max_length=77, return_tensors="pt")
            hf_model.get_text_features(**enc)

    ck_bf16 = clipkit_embedder(batch, "bf16")
    return {"clipkit": lambda: ck.texts(texts), "open_clip": open_clip_run, "transformers": hf_run,
            "clipkit --precision bf16": lambda: ck_bf16.texts(texts)}


def interleaved(runners: dict[str, Callable[[], None]], rounds: int) -> dict[str, list[float]]:
    """Seconds per call, the libraries taking turns each round (after one warm-up call each); the order rotates
    by one each round, so no runner always follows the same neighbour."""
    for run in runners.values():
        run()
    names = list(runners)
    times: dict[str, list[float]] = {k: [] for k in runners}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            runners[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def report(title: str, times: dict[str, list[float]], n: int, unit: str) -> None:
    print(f"\n### {title} ({n} {unit}, {len(times['clipkit'])} interleaved rounds)\n")
    print(f"| library | {unit}/s (median) | min s | median s | max s | clipkit speed-up min / median / max |")
    print("|---|---|---|---|---|---|")
    ck = times["clipkit"]
    for name, t in times.items():
        ratios = [o / c for o, c in zip(t, ck)]  # per round: their time / clipkit's (< 1 for the tower alone)
        speed = "" if name == "clipkit" else \
            f"{min(ratios):.2f}x / {statistics.median(ratios):.2f}x / {max(ratios):.2f}x"
        print(f"| {name} | {n / statistics.median(t):.1f} | {min(t):.2f} | {statistics.median(t):.2f} | "
              f"{max(t):.2f} | {speed} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--texts", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--skip-images", action="store_true")
    p.add_argument("--skip-texts", action="store_true")
    p.add_argument("--skip-peers", action="store_true",
                   help="images: only clipkit end to end and its tower alone (more rounds in the same time)")
    args = p.parse_args()
    from clipkit.model.precision import inference_precision

    print(f"# bench_embed: {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"clipkit precision auto -> {inference_precision('auto', 'cpu')}")
    if not args.skip_images:
        with tempfile.TemporaryDirectory() as d:
            paths = make_jpegs(Path(d), args.images)
            times = interleaved(image_runners(paths, args.batch, not args.skip_peers), args.rounds)
        report("images end to end from 640x480 JPEG files, ViT-B-32, batch %d" % args.batch, times, args.images,
               "images")
    if not args.skip_texts:
        times = interleaved(text_runners(prompts(args.texts), args.batch), args.rounds)
        report("short prompts, ViT-B-32 text tower, batch %d" % args.batch, times, args.texts, "prompts")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
