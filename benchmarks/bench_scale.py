"""How cost grows with the number of items: training from tar shards vs from a table + decoded cache, embedding,
and the search index, at each `--sizes`, with a fitted growth exponent (cost ~ N^b) between the sizes measured.

Training (one fresh subprocess per row, so peak RSS is its own): the same micro model, batch and step count on
synthetic 32 px JPEG images, from the table with its uint8 cache (the default for tables) and from shards written
by `clipkit data shards` (streamed, no cache). Embedding: `clipkit embed`'s library call over the whole table.
Index: clipkit's `auto` index of clustered synthetic unit vectors (dim 512): build time, bytes/vector, p50/p99
single-query latency and recall@10 against exact search (bench_search.py's measurement).

    python benchmarks/bench_scale.py                      # 1k and 10k items (~6 min on 2 busy cores)
    python benchmarks/bench_scale.py --sizes 1000 10000 100000
    python benchmarks/bench_scale.py --sizes 10000 100000 1000000 --train-sizes 10000 100000   # hours, ~30 GB
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_search import clustered, markdown, measure  # noqa: E402  (the same index measurement)

IMAGE_PX, BATCH, STEPS, WARMUP_STEPS = 32, 32, 40, 5


# ---- data ------------------------------------------------------------------------------------------------------

def make_images(root: Path, n: int, seed: int = 0) -> Path:
    """`n` synthetic captioned JPEGs (a coloured shape on a coloured ground) and their table `train.csv`."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (n, 2, 3))
    kinds = rng.integers(0, 3, n)
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        img = Image.new("RGB", (IMAGE_PX + 8, IMAGE_PX + 8), tuple(int(c) for c in colours[i, 0]))
        draw, fill, box = ImageDraw.Draw(img), tuple(int(c) for c in colours[i, 1]), (6, 6, IMAGE_PX, IMAGE_PX)
        (draw.ellipse, draw.rectangle, draw.pieslice)[kinds[i]](box, fill=fill, **({"start": 0, "end": 270}
                                                                                  if kinds[i] == 2 else {}))
        img.save(root / "img" / f"{i:07d}.jpg", quality=90)
        rows.append((f"img/{i:07d}.jpg", f"a {('round', 'square', 'cut')[kinds[i]]} shape in colour {fill}"))
    pd.DataFrame(rows, columns=["image", "caption"]).to_csv(root / "train.csv", index=False)
    return root / "train.csv"


def micro_model(out: Path) -> Path:
    """The tests' micro model (2-layer ViT on 32 px, 1-layer text): cheap steps, so the data path shows."""
    import clipkit
    from clipkit.model.factory import resolve_config

    cfg = resolve_config("tiny", image_size=IMAGE_PX, depth=2, embed_dim=32)
    cfg.vision.timm_kwargs.update(embed_dim=48, num_heads=2)
    cfg.text.hf_config.update(hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2,
                              vocab_size=300)
    model, tok = clipkit.create_model_and_tokenizer(cfg)
    return clipkit.save(model, tok, out)


# ---- training (a child process per row) ------------------------------------------------------------------------

def child_train(kind: str, data: str, model: str, out: str) -> dict:
    """Train STEPS steps in this process; setup time, steady samples/s, peak RSS and cache bytes."""
    import clipkit
    from clipkit.train import TrainConfig, Trainer

    clipkit.load(model)  # imports torch, timm, transformers and builds the model once: the baseline
    base_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0, marks = time.perf_counter(), {}
    cfg = TrainConfig(train_data=data, output=out, model=model, batch_size=BATCH, max_steps=STEPS, epochs=1,
                      lr=1e-3, warmup_steps=2, checkpoint_every=10 ** 9, log_every=10 ** 9, progress=False,
                      cache_images=kind == "table+cache", shuffle_buffer=1000, num_workers=0,
                      train_tokenizer=False)

    def on_step(step: int) -> None:
        if step in (WARMUP_STEPS, STEPS):
            marks[step] = time.perf_counter()

    trainer = Trainer(cfg, on_step=on_step)
    setup = time.perf_counter() - t0
    trainer.fit()
    cache = Path(out) / "image_cache"
    return {"setup_s": setup, "samples_per_s": (STEPS - WARMUP_STEPS) * BATCH / (marks[STEPS] - marks[WARMUP_STEPS]),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_over_base_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base_mb,
            "cache_mb": sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) / 1e6 if cache.exists() else 0.0}


def train_row(kind: str, n: int, data: str, model: Path, tmp: Path) -> dict:
    out = tmp / f"run-{kind}-{n}"
    cmd = [sys.executable, __file__, "--child", kind, data, str(model), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} at {n}: {proc.stderr[-2000:]}")
    row = {"items": n, "source": kind, **json.loads(proc.stdout.strip().splitlines()[-1])}
    print(f"  trained {kind} at {n:,}: {row}", file=sys.stderr, flush=True)
    return row


def training(n: int, tmp: Path, model: Path) -> tuple[list[dict], dict]:
    """Both training rows at `n` items, and the cost of getting there (images, shards, embedding)."""
    from clipkit.data.shard_writer import write_shards
    from clipkit.search.collection import embed_collection

    t0 = time.perf_counter()
    table = make_images(tmp / f"data-{n}", n)
    made = time.perf_counter() - t0
    shards = write_shards(table, tmp / f"shards-{n}", shard_size=1000, progress=False)
    rows = [train_row("shards", n, shards.spec, model, tmp), train_row("table+cache", n, str(table), model, tmp)]
    emb = embed_collection(str(model), table, tmp / f"emb-{n}", shard_size=2000, num_workers=0, progress=False,
                           captions=False)
    prep = {"items": n, "make_images_s": made, "write_shards_s": shards.seconds, "shard_mb": shards.bytes / 1e6,
            "embed_images_per_s": emb.images_per_second}
    print(f"  prepared {n:,}: {prep}", file=sys.stderr, flush=True)
    return rows, prep


# ---- index -----------------------------------------------------------------------------------------------------

def index_row(n: int, dim: int, queries: int) -> dict:
    from clipkit.search import SearchIndex, exact_search

    xb, xq = clustered(n, dim, queries)
    truth = exact_search(xb, xq, 10)[1]
    index = SearchIndex.build(xb, kind="auto", keep_vectors=False)
    row = {"items": n, **measure("auto", index, xq, truth, n_single=200)}
    return {k: row[k] for k in ("items", "factory", "build_s", "bytes_per_vec", "p50_1q_ms", "p99_1q_ms", "recall@10")}


# ---- growth ----------------------------------------------------------------------------------------------------

def growth(sizes: list[int], values: list[float]) -> str:
    """The exponent b of a least-squares fit value ~ N^b over the sizes, with its usual name."""
    if len(sizes) < 2:
        return "n/a (one size)"
    if min(values) <= 0:
        return "n/a (zero at some size)"
    b = float(np.polyfit(np.log(sizes), np.log(values), 1)[0])
    name = ("falls with N (fixed costs spread, or noise)" if b <= -0.15 else "flat" if b < 0.15
            else "sub-linear (log n .. sqrt n)" if b < 0.85 else "linear" if b < 1.15 else "n log n or worse")
    return f"N^{b:.2f} ({name})"


def growth_table(df: pd.DataFrame, columns: list[str], by: str | None = None) -> str:
    lines = []
    for key, part in ([(None, df)] if by is None else df.groupby(by)):
        for col in columns:
            fit = growth(part["items"].tolist(), part[col].astype(float).tolist())
            lines.append(f"| {key or ''} | {col} | {fit} |")
    return "| rows | measure | growth over the sizes measured |\n|---|---|---|\n" + "\n".join(lines)


def machine() -> str:
    try:
        info = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
        model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("Model name")), "?")
    except OSError:
        model = platform.processor() or "?"
    return f"{model}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000], help="index sizes (default 1k 10k)")
    p.add_argument("--train-sizes", type=int, nargs="+", help="training/embedding sizes (default: --sizes)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=512)
    p.add_argument("--tmp", help="scratch folder (default: a temp dir); 1M images need ~5 GB, shards as much again")
    p.add_argument("--child", nargs=4, metavar=("KIND", "DATA", "MODEL", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child_train(*args.child)))
        return
    import faiss

    faiss.omp_set_num_threads(1)
    print(f"# bench_scale: {machine()}; batch {BATCH}, {STEPS} steps ({WARMUP_STEPS} warm-up), {IMAGE_PX} px")
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp_name:
        tmp = Path(tmp_name)
        model = micro_model(tmp / "model")
        train_rows, prep = [], []
        for n in args.train_sizes or args.sizes:
            rows, cost = training(n, tmp, model)
            train_rows += rows
            prep.append(cost)
        index_rows = [index_row(n, args.dim, args.queries) for n in args.sizes]
    report(pd.DataFrame(train_rows), pd.DataFrame(prep), pd.DataFrame(index_rows))


def report(train: pd.DataFrame, prep: pd.DataFrame, index: pd.DataFrame) -> None:
    print("\n### Training: streamed shards vs table + decoded cache (one process each, workers 0)\n")
    print(markdown(train, ".4g"))
    print("\n### Data preparation and embedding (`clipkit data shards`, `clipkit embed`, micro model)\n")
    print(markdown(prep, ".4g"))
    print("\n### Index: clipkit `auto`, clustered synthetic vectors, 1 FAISS thread\n")
    print(markdown(index, ".4g"))
    print("\n### Growth (fit of cost ~ N^b over the sizes above)\n")
    print(growth_table(train, ["setup_s", "samples_per_s", "peak_rss_mb", "rss_over_base_mb", "cache_mb"], by="source"))
    print(growth_table(prep, ["write_shards_s", "shard_mb", "embed_images_per_s"]).split("\n", 2)[2])
    print(growth_table(index, ["build_s", "bytes_per_vec", "p50_1q_ms", "p99_1q_ms"]).split("\n", 2)[2])
    for source, part in train.sort_values("items").groupby("source"):
        rss, over = part["peak_rss_mb"].tolist(), part["rss_over_base_mb"].tolist()
        if len(rss) >= 2:
            print(f"\npeak RSS, {source}, largest vs smallest size: {rss[-1] / rss[0]:.3f}x "
                  f"(above the imports + model: {over[0]:.0f} -> {over[-1]:.0f} MB)")


if __name__ == "__main__":
    main()
