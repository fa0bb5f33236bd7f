"""Search benchmark: exact FAISS search (Flat) vs clipkit's `auto` index vs `auto` + exact rerank, on the same
vectors in one process. Measures build time, index bytes per vector, p50/p99 latency for single queries and
batches of 64, and recall@10 against exact search; prints a markdown table and ratios vs exact.

Data: clustered synthetic unit vectors (dimension 512 by default) at each `--sizes`, and optionally real clipkit
embeddings of the emoji images (`--model DIR --emoji-data DIR`, queried by the test captions' text embeddings).

    python benchmarks/bench_search.py --sizes 100000            # ~2 min on 2 cores
    python benchmarks/bench_search.py --sizes 100000 1000000
    python benchmarks/bench_search.py --quick
    python benchmarks/bench_search.py --sizes 100000 --model MODEL_DIR --emoji-data EMOJI_DIR
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import pandas as pd

from clipkit.search import SearchIndex, exact_search, recall_at_k

K, BATCH = 10, 64


def clustered(n: int, d: int, nq: int, seed: int = 0, clusters: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """n base + nq query unit vectors from one mixture of `clusters` Gaussian blobs (queries are not in the base)."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, d)).astype(np.float32)
    out = np.empty((n + nq, d), np.float32)
    for lo in range(0, n + nq, 100_000):  # in slices: bounded temporaries at 1M x 512
        m = min(100_000, n + nq - lo)
        out[lo:lo + m] = centers[rng.integers(0, clusters, m)] + 0.7 * rng.standard_normal((m, d), np.float32)
    faiss.normalize_L2(out)
    return out[:n], out[n:]


def emoji_vectors(model: str, data_dir: str, workers: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Image embeddings of every emoji image (via clipkit.search.collection) and text embeddings of the test captions."""
    from clipkit.search.collection import embed_collection, load_collection
    from clipkit.embed import Embedder

    embedder = Embedder(model, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        summary = embed_collection(embedder, Path(data_dir) / "images", tmp, num_workers=workers, captions=False,
                                   progress=False)
        xb, meta = load_collection(tmp)
    captions = pd.read_csv(Path(data_dir) / "test.csv")["caption"].astype(str).tolist()
    return xb[meta["ok"].to_numpy()], embedder.texts(captions), summary.images_per_second


def markdown(df: pd.DataFrame, fmt: str) -> str:
    """A markdown table (pandas' to_markdown needs the optional tabulate package)."""
    cell = lambda v: f"{v:{fmt}}" if isinstance(v, (float, np.floating)) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    return "\n".join(lines + ["| " + " | ".join(map(cell, row)) + " |" for row in df.itertuples(index=False)])


def timed(fn, batches: list[np.ndarray]) -> tuple[np.ndarray, list]:
    """Per-call latency in ms, and the calls' results."""
    times, results = [], []
    for q in batches:
        t0 = time.perf_counter()
        results.append(fn(q))
        times.append((time.perf_counter() - t0) * 1e3)
    return np.array(times), results


def measure(name: str, index: SearchIndex, xq: np.ndarray, truth: np.ndarray, n_single: int,
            rerank: int = 0) -> dict:
    """Latency (single queries, batches of 64) and recall@10 (over the batched results) of one index."""
    search = lambda q: index.search(q, K, rerank=rerank)  # noqa: E731
    search(xq[:BATCH])  # warm-up
    batched, results = timed(search, [xq[i:i + BATCH] for i in range(0, len(xq), BATCH)])
    single, _ = timed(search, [xq[i] for i in range(min(n_single, len(xq)))])
    r = index.build_report
    print(f"  measured {name} ({index.factory}, built in {r['build_seconds']:.1f}s)", file=sys.stderr, flush=True)
    return {"method": name, "factory": index.factory, "build_s": r["build_seconds"],
            "bytes_per_vec": r["bytes_per_vector"] + (4 * index.dim if rerank else 0),
            "p50_1q_ms": np.percentile(single, 50), "p99_1q_ms": np.percentile(single, 99),
            "p50_64q_ms": np.percentile(batched, 50), "p99_64q_ms": np.percentile(batched, 99),
            "recall@10": recall_at_k(np.concatenate([ids for _, ids in results]), truth, K)}


def run(label: str, xb: np.ndarray, xq: np.ndarray, args: argparse.Namespace) -> pd.DataFrame:
    """All three methods on one (base, queries) pair; prints and returns the table."""
    t0 = time.perf_counter()
    truth = exact_search(xb, xq, K)[1]
    print(f"\n### {label}: {len(xb):,} vectors x {xb.shape[1]}, {len(xq)} queries "
          f"(ground truth {time.perf_counter() - t0:.1f}s)\n", flush=True)
    rows = []
    exact = SearchIndex.build(xb, kind="flat", keep_vectors=False)
    rows.append(measure("exact (Flat)", exact, xq, truth, args.single))
    del exact
    auto = SearchIndex.build(xb, kind="auto", keep_vectors=True)
    rows.append(measure("auto", auto, xq, truth, args.single))
    for r in args.rerank:
        rows.append(measure(f"auto + rerank {r}", auto, xq, truth, args.single, rerank=r))
    report = {k: v for k, v in auto.build_report.items() if k not in ("kind", "count")}
    del auto
    table = pd.DataFrame(rows)
    print(markdown(table, ".4g"))
    base = table.iloc[0]
    ratios = pd.DataFrame({
        "method": table["method"], "build time": table["build_s"] / base["build_s"],
        "bytes/vector": table["bytes_per_vec"] / base["bytes_per_vec"],
        "speedup p50 1q": base["p50_1q_ms"] / table["p50_1q_ms"],
        "speedup p50 64q": base["p50_64q_ms"] / table["p50_64q_ms"], "recall@10": table["recall@10"]})
    print("\nratios vs exact (speedup > 1 is faster than exact):\n")
    print(markdown(ratios, ".3g"))
    print(f"\nauto build report (its own recall estimate on 200 base rows): {report}", flush=True)
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=1024, help="query vectors (batches of 64; recall uses all)")
    p.add_argument("--single", type=int, default=200, help="single-query latency samples")
    p.add_argument("--rerank", type=int, nargs="+", default=[4, 10], help="rerank factors: one `auto + rerank R` "
                   "row each (default 4 10; the build report estimates recall at 10)")
    p.add_argument("--threads", type=int, default=1, help="FAISS OpenMP threads (default 1: on a shared box "
                   "spinning OpenMP threads inflate single-query latency 20x)")
    p.add_argument("--quick", action="store_true", help="one small size, fewer queries (smoke run)")
    p.add_argument("--model", help="clipkit model dir: also benchmark real embeddings of the emoji images")
    p.add_argument("--emoji-data", help="emoji dataset dir (`clipkit data emoji --out DIR`)")
    p.add_argument("--workers", type=int, default=2, help="decoding workers for the emoji embedding")
    args = p.parse_args()
    if args.quick:
        args.sizes, args.queries, args.single = [20_000], 256, 50
    faiss.omp_set_num_threads(args.threads)
    print(f"# bench_search: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"faiss {faiss.__version__}, {args.threads} threads")
    for n in args.sizes:
        t0 = time.perf_counter()
        xb, xq = clustered(n, args.dim, args.queries)
        run(f"clustered synthetic (made in {time.perf_counter() - t0:.1f}s)", xb, xq, args)
        del xb, xq
    if args.model and args.emoji_data:
        xb, xq, ips = emoji_vectors(args.model, args.emoji_data, args.workers)
        run(f"emoji images, clipkit embeddings ({ips:.0f} images/s embedding), test captions as queries",
            xb, xq, args)


if __name__ == "__main__":
    main()
