"""Training step, clipkit against open_clip: same architecture, batch size and random data, one process.

One step = forward, symmetric InfoNCE loss, backward, AdamW step, zero_grad. The two libraries' steps
are timed interleaved after warmup; peak memory is measured per batch size in subprocesses (this script
with `--child KIND`) and extrapolated to the largest batch that fits a memory budget. Context rows: the
gradient cache, and the `tiny-minilm` recipe (locked MiniLM, cached text features) against training both
towers.

    python benchmarks/bench_train.py             # full run (~6 minutes on 2 CPU cores; add --threads 1 on a busy machine)
    python benchmarks/bench_train.py --quick     # sanity run (~1 minute)
    python benchmarks/bench_train.py --device cuda --precision bf16
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

KINDS = ("clipkit", "open_clip", "clipkit-gc", "minilm-locked", "minilm-full")
LABELS = {
    "clipkit": "clipkit `tiny` (timm ViT + HF CLIP text)",
    "open_clip": "open_clip CLIP, same shape",
    "clipkit-gc": "clipkit `tiny` + gradient cache",
    "minilm-locked": "clipkit `tiny-minilm`, locked MiniLM, cached text",
    "minilm-full": "clipkit `tiny-minilm`, both towers trained",
    "clipkit-image": "clipkit image tower (timm ViT), fwd+bwd",
    "open_clip-image": "open_clip image tower, fwd+bwd",
    "clipkit-text": "clipkit text tower (HF CLIPTextModel), fwd+bwd",
    "open_clip-text": "open_clip text tower, fwd+bwd",
}
CTX, VOCAB, SEED = 32, 8192, 0
LR, WD, BETAS, EPS = 1e-4, 0.1, (0.9, 0.98), 1e-6


@dataclass
class Runner:
    """A model, its optimizer and a fixed batch: `step()` runs one full training step."""

    kind: str
    batch: int
    params: int
    optimizer: Optional[torch.optim.Optimizer]
    step: Callable[[], Any]


# ---- models and data -----------------------------------------------------------------------------

def open_clip_tiny() -> torch.nn.Module:
    """open_clip's CLIP with clipkit `tiny`'s shape: ViT 6x192 (3 heads) on 64 px / patch 8, text 4x256."""
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    vision = CLIPVisionCfg(layers=6, width=192, head_width=64, patch_size=8, image_size=64)
    text = CLIPTextCfg(context_length=CTX, vocab_size=VOCAB, width=256, heads=4, layers=4)
    return open_clip.CLIP(embed_dim=256, vision_cfg=vision, text_cfg=text)


def make_tokens(batch: int, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    """Random ids `[B, CTX]` of random length, ending in the largest id (open_clip pools at the argmax)."""
    g = torch.Generator().manual_seed(seed + 1)
    lengths = torch.randint(4, CTX + 1, (batch,), generator=g)
    ids = torch.randint(3, vocab - 1, (batch, CTX), generator=g)
    mask = (torch.arange(CTX)[None, :] < lengths[:, None]).long()  # [B, CTX]
    ids = ids * mask
    ids[torch.arange(batch), lengths - 1] = vocab - 1
    return {"input_ids": ids, "attention_mask": mask}


def make_pixels(batch: int, seed: int) -> torch.Tensor:
    """Seeded normalised-looking pixels `[B, 3, 64, 64]`."""
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def n_params(model: torch.nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def adamw(model: torch.nn.Module, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW with no decay on 1-d parameters (biases, norms, scales) and embeddings, for either library's model
    (clipkit's `param_groups` now needs a clipkit model: its layer groups); `fused`: as clipkit's Trainer runs it,
    open_clip's training script uses torch's default (foreach)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    no_decay = [p for n, p in params if p.ndim < 2 or "embed" in n or "token" in n]
    decay = [p for n, p in params if not (p.ndim < 2 or "embed" in n or "token" in n)]
    groups = [{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS, fused=fused or None)


def precision_ctx(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def finish(loss: torch.Tensor, opt: torch.optim.Optimizer, backward: bool = True) -> float:
    """Backward (unless done already), optimizer step, zero_grad; returns the loss."""
    if backward:
        loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


# ---- one runner per kind -------------------------------------------------------------------------

def build_runner(kind: str, batch: int, device: torch.device, precision: str, chunk: int) -> Runner:
    """Model, optimizer and data for `kind`, all seeded the same way; `step()` trains one batch."""
    torch.manual_seed(SEED)
    pixels = make_pixels(batch, SEED).to(device)
    amp = lambda: precision_ctx(device, precision)  # noqa: E731
    if kind == "open_clip":
        from open_clip.loss import ClipLoss

        model, loss_fn = open_clip_tiny().to(device).train(), ClipLoss()
        ids, opt = make_tokens(batch, VOCAB, SEED)["input_ids"].to(device), adamw(model)

        def step() -> float:
            with amp():
                img, txt, scale = model(pixels, ids)
                return finish(loss_fn(img, txt, scale), opt)

        return Runner(kind, batch, n_params(model), opt, step)
    from clipkit.model.precision import training_autocast

    clipkit_amp = lambda: training_autocast(precision, device)  # noqa: E731 -- what clipkit's Trainer runs under
    return _clipkit_runner(kind, batch, device, pixels, clipkit_amp, chunk)


def _clipkit_runner(kind: str, batch: int, device: torch.device, pixels: torch.Tensor,
                    amp: Callable[[], Any], chunk: int) -> Runner:
    import clipkit
    from clipkit.train.losses import ClipLoss, grad_cache_step

    preset = "tiny-minilm" if kind.startswith("minilm") else "tiny"
    model, loss_fn = clipkit.create_model(preset).to(device).train(), ClipLoss()
    vocab = int(model.text.config.vocab_size)
    tokens = {k: v.to(device) for k, v in make_tokens(batch, vocab, SEED).items()}
    pooled = None
    if kind == "minilm-locked":
        model.lock_text_tower()
        with torch.no_grad():
            pooled = model.text_pooled(tokens)  # [B, 384], what the Trainer caches once per caption
    opt = adamw(model, fused=True)

    def step() -> float:
        with amp():
            if kind == "clipkit-gc":
                scale, bias = model.scales()
                loss = grad_cache_step(model.encode_image, model.encode_text, pixels, tokens, loss_fn,
                                       scale, bias, chunk_size=min(chunk, batch))
                return finish(loss, opt, backward=False)
            out = model(pixels, tokens, text_pooled=pooled)
            return finish(loss_fn(out.image_features, out.text_features, out.logit_scale, out.logit_bias), opt)

    return Runner(kind, batch, n_params(model, trainable=True), opt, step)


# ---- timing --------------------------------------------------------------------------------------

Times = dict[str, dict[str, list[float]]]  # kind -> {"wall": [...], "cpu": [...]}


def timed(runner: Runner, device: torch.device) -> tuple[float, float]:
    """Wall-clock and process-CPU seconds of one training step."""
    sync(device)
    w0, c0 = time.perf_counter(), time.process_time()
    runner.step()
    sync(device)
    return time.perf_counter() - w0, time.process_time() - c0


def interleave(runners: Sequence[Runner], repeats: int, warmup: int, device: torch.device) -> Times:
    """Step times per runner, taken round-robin (order reversed every other round) after warmup."""
    for r in runners:
        for _ in range(warmup):
            r.step()
    times: Times = {r.kind: {"wall": [], "cpu": []} for r in runners}
    for i in range(repeats):
        for r in runners if i % 2 == 0 else list(reversed(runners)):
            wall, cpu = timed(r, device)
            times[r.kind]["wall"].append(wall)
            times[r.kind]["cpu"].append(cpu)
    return times


def stats_row(r: Runner, t: dict[str, list[float]], base: dict[str, list[float]]) -> str:
    """A markdown row: wall seconds min/median/max, samples/s, CPU seconds, time ratios to `base` (medians)."""
    med = {k: statistics.median(v) for k, v in t.items()}
    ratio = {k: med[k] / statistics.median(base[k]) for k in med}
    w = t["wall"]
    return (f"| {LABELS[r.kind]} | {r.params / 1e6:.2f}M | {r.batch} | {min(w):.3f} | {med['wall']:.3f} | {max(w):.3f} "
            f"| {r.batch / med['wall']:.1f} | {ratio['wall']:.2f} | {med['cpu']:.3f} | {ratio['cpu']:.2f} |")


def timing_table(runners: Sequence[Runner], times: Times, base: Callable[[str], str], base_name: str) -> list[str]:
    """Markdown table of step times; ratios are a row's median time over its `base(kind)` row's (below 1: faster)."""
    head = ["| step | trainable params | batch | wall s min | wall s median | wall s max | samples/s "
            f"| wall / {base_name} | CPU s median | CPU / {base_name} |", "|---|---|---|---|---|---|---|---|---|---|"]
    return head + [stats_row(r, times[r.kind], times[base(r.kind)]) for r in runners]


def tower_runners(batch: int, device: torch.device, precision: str) -> list[Runner]:
    """Forward+backward of each tower alone (normalised features summed), clipkit and open_clip alternating."""
    import clipkit

    torch.manual_seed(SEED)
    ck, oc = clipkit.create_model("tiny").to(device).train(), open_clip_tiny().to(device).train()
    pixels, tokens = make_pixels(batch, SEED).to(device), {k: v.to(device) for k, v in make_tokens(batch, VOCAB, SEED).items()}

    from clipkit.model.precision import training_autocast

    def fwd_bwd(model: torch.nn.Module, encode: Callable[[Any], torch.Tensor], x: Any) -> Callable[[], None]:
        amp = training_autocast if model is ck else precision_ctx  # each library's training autocast
        args = (precision, device) if model is ck else (device, precision)

        def step() -> None:
            with amp(*args):
                encode(x).sum().backward()  # [B, D] -> scalar
            model.zero_grad(set_to_none=True)
        return step

    return [
        Runner("clipkit-image", batch, n_params(ck.visual) + n_params(ck.visual_proj), None, fwd_bwd(ck, ck.encode_image, pixels)),
        Runner("open_clip-image", batch, n_params(oc.visual), None,
               fwd_bwd(oc, lambda x: oc.encode_image(x, normalize=True), pixels)),
        Runner("clipkit-text", batch, n_params(ck.text) + n_params(ck.text_proj), None, fwd_bwd(ck, ck.encode_text, tokens)),
        Runner("open_clip-text", batch, n_params(oc) - n_params(oc.visual) - 1, None,
               fwd_bwd(oc, lambda t: oc.encode_text(t["input_ids"], normalize=True), tokens)),
    ]


def attention_note() -> str:
    """Which attention kernels the clipkit towers use (what the per-tower rows compare)."""
    import clipkit

    m = clipkit.create_model("tiny")
    fused = all(getattr(b.attn, "fused_attn", False) for b in m.visual.blocks)
    return (f"clipkit: timm Attention fused_attn={fused} (one qkv Linear -> F.scaled_dot_product_attention; "
            "SDPA's math backend in CPU bf16 training), "
            f"transformers attn_implementation={m.text.config._attn_implementation!r}; "
            "open_clip: torch.nn.MultiheadAttention (packed in_proj, SDPA inside, batch_first)")


# ---- memory (one subprocess per measurement) -----------------------------------------------------

def _proc_status_mb(field: str) -> Optional[float]:
    """A `VmRSS`/`VmHWM` line of /proc/self/status in MiB, or None off Linux."""
    with contextlib.suppress(OSError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    return None


def reset_peak_rss() -> float:
    """Reset the peak-RSS mark (Linux `clear_refs` 5) and return the current RSS in MiB.

    Needed because `ru_maxrss` carries the parent's peak across fork+exec, so a child started by a
    2 GB parent would report at least 2 GB whatever it did.
    """
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    now = _proc_status_mb("VmRSS")
    return now if now is not None else peak_rss_mb()


def peak_rss_mb() -> float:
    """Peak RSS in MiB since the last reset (VmHWM), else `ru_maxrss` (peak since process start)."""
    hwm = _proc_status_mb("VmHWM")
    if hwm is not None:
        return hwm
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def child_main(args: argparse.Namespace) -> int:
    """Build one runner, run `--steps` steps; print JSON: memory above the post-creation baseline, step time."""
    device = torch.device(args.device)
    runner = build_runner(args.child, args.batch_size, device, args.precision, args.cache_chunk)
    prime_optimizer(runner.optimizer)
    base = reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) / 2**20
    times = [timed(runner, device) for _ in range(args.steps)]
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss_mb()
    print(json.dumps({"kind": args.child, "batch": args.batch_size, "base_mb": base, "peak_mb": peak,
                      "extra_mb": peak - base, "step_s": times[-1][0], "cpu_s": times[-1][1]}))
    return 0


def prime_optimizer(opt: torch.optim.Optimizer) -> None:
    """Allocate AdamW's state with a zero-gradient step, so the baseline holds model + optimizer state."""
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)


def run_child(kind: str, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    """This script in a fresh process for one (kind, batch): its JSON report (2 steps, 1 above 512)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--batch-size", str(batch),
           "--steps", "2" if batch <= 512 else "1", "--device", args.device, "--precision", args.precision,
           "--cache-chunk", str(args.cache_chunk), "--threads", str(torch.get_num_threads())]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"child {kind} @ {batch} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory_row(kind: str, r: dict[str, Any], note: str = "") -> str:
    """A markdown row of one child's report (its step time is a single, not interleaved, measurement)."""
    return (f"| {LABELS[kind]}{note} | {r['batch']} | {r['extra_mb']:.0f} | {r['step_s']:.2f} "
            f"| {r['batch'] / r['step_s']:.1f} | {r['cpu_s']:.2f} |")


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares `y = a + b x`."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def memory_section(args: argparse.Namespace) -> list[str]:
    """Extra memory per batch size for both libraries, the budget extrapolation, and the gradient cache."""
    budget = args.budget_gb * 1024
    lines = ["| step | batch | peak memory above baseline (MiB) | wall s / step | samples/s | CPU s / step |",
             "|---|---|---|---|---|---|"]
    fits = {}
    for kind in ("clipkit", "open_clip"):
        reps = [run_child(kind, b, args) for b in args.mem_batches]
        lines += [memory_row(kind, r) for r in reps]
        fits[kind] = fit_line([r["batch"] for r in reps], [r["extra_mb"] for r in reps])
    gc = [run_child("clipkit-gc", b, args) for b in args.cache_batches]
    lines += [memory_row("clipkit-gc", r, f" (chunk {args.cache_chunk})") for r in gc]
    lines += ["", f"Linear fit of extra memory `a + b*B` over B in {list(args.mem_batches)}; the largest batch "
              f"within {args.budget_gb:g} GiB is an extrapolation, not a measurement:", ""]
    lines += ["| step | a (MiB) | b (MiB / sample) | largest batch in budget |", "|---|---|---|---|"]
    for kind, (a, b) in fits.items():
        lines.append(f"| {LABELS[kind]} | {a:.0f} | {b:.2f} | ~{int((budget - a) / b)} |")
    chunk_mem = fits["clipkit"][0] + fits["clipkit"][1] * args.cache_chunk
    lines.append(f"| {LABELS['clipkit-gc']} | measured {gc[-1]['extra_mb']:.0f} MiB at B={gc[-1]['batch']} "
                 f"(plain step at B={args.cache_chunk}: ~{chunk_mem:.0f} MiB) | ~0 | limited by time, not memory |")
    return lines


def throughput_ratios(times: Times) -> str:
    """clipkit's throughput over open_clip's, from median wall and median CPU seconds per step."""
    r = {k: statistics.median(times["open_clip"][k]) / statistics.median(times["clipkit"][k]) for k in ("wall", "cpu")}
    return (f"clipkit / open_clip throughput (median step time ratio): wall clock {r['wall']:.2f}x, "
            f"process CPU time {r['cpu']:.2f}x (above 1: clipkit faster)")


# ---- report --------------------------------------------------------------------------------------

def machine() -> str:
    from clipkit.model.precision import cpu_name

    return f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def versions() -> str:
    import open_clip
    import timm
    import transformers

    return f"open_clip {open_clip.__version__}, timm {timm.__version__}, transformers {transformers.__version__}"


def quiet_progress_bars() -> None:
    """transformers draws a weight-loading bar for every pretrained tower; keep the report clean."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=20, help="timed steps per library (interleaved)")
    p.add_argument("--context-repeats", type=int, default=8, help="timed steps per context row")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16 = torch.autocast")
    p.add_argument("--mem-batches", type=lambda s: [int(x) for x in s.split(",")], default=[64, 128, 256])
    p.add_argument("--cache-batches", type=lambda s: [int(x) for x in s.split(",")], default=[256, 1024])
    p.add_argument("--cache-chunk", type=int, default=64)
    p.add_argument("--budget-gb", type=float, default=8.0, help="memory budget (GiB) for the largest batch")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-context", action="store_true")
    p.add_argument("--skip-towers", action="store_true")
    p.add_argument("--quick", action="store_true", help="few repeats, small batches")
    p.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.batch_size, args.repeats, args.context_repeats, args.warmup = 16, 3, 2, 1
        args.mem_batches, args.cache_batches, args.cache_chunk = [16, 32], [128], 16
    return args


def pair_section(args: argparse.Namespace, device: torch.device) -> list[str]:
    """The headline: clipkit's and open_clip's training steps, interleaved, with parameter counts."""
    pair = [build_runner(k, args.batch_size, device, args.precision, args.cache_chunk) for k in ("clipkit", "open_clip")]
    times = interleave(pair, args.repeats, args.warmup, device)
    return [f"parameters: clipkit {pair[0].params:,}, open_clip {pair[1].params:,} "
            f"(difference {pair[0].params - pair[1].params:+,})", "",
            f"### Training step, interleaved x{args.repeats} after {args.warmup} warmup", "",
            *timing_table(pair, times, lambda k: "open_clip", "open_clip"), "", throughput_ratios(times), ""]


def context_section(args: argparse.Namespace, device: torch.device) -> list[str]:
    """clipkit alone: the gradient cache and the locked-MiniLM recipe against the plain step."""
    kinds = ("clipkit", "clipkit-gc", "minilm-locked", "minilm-full")
    runners = [build_runner(k, args.batch_size, device, args.precision, args.cache_chunk) for k in kinds]
    times = interleave(runners, args.context_repeats, 1, device)
    return [f"### Context, interleaved x{args.context_repeats} (gradient cache chunk "
            f"{min(args.cache_chunk, args.batch_size)})", "", *timing_table(runners, times, lambda k: "clipkit", "clipkit"), ""]


def tower_section(args: argparse.Namespace, device: torch.device) -> list[str]:
    """Each tower's forward+backward, clipkit against open_clip: where a difference in the step comes from."""
    runners = tower_runners(args.batch_size, device, args.precision)
    times = interleave(runners, args.context_repeats, 1, device)
    base = lambda k: "open_clip-" + k.split("-")[-1]  # noqa: E731
    return [f"### Per tower, forward+backward, interleaved x{args.context_repeats}", "", attention_note(), "",
            *timing_table(runners, times, base, "open_clip"), ""]


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_progress_bars()
    if args.child:
        return child_main(args)
    device = torch.device(args.device)
    print(f"machine: {machine()}; {versions()}; device {device}, {args.precision}\n")
    sections = [(pair_section, False), (context_section, args.skip_context), (tower_section, args.skip_towers)]
    for section, skip in sections:
        if not skip:
            print("\n".join(section(args, device)), flush=True)
    if not args.skip_memory:
        print("### Peak memory (one subprocess per row)\n")
        print("\n".join(memory_section(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
