"""The int8 image tower two ways: clipkit's (torch dynamic quantisation of the Linear layers) against ONNX Runtime
(the same tower exported to ONNX, fp32 and dynamically quantised int8), one process, interleaved rounds.

Random-initialised ViT-B-32 image tower on random pixels (no weights are downloaded); speed per round and the
lowest cosine of each path's embeddings to torch fp32's. Needs `pip install onnxruntime onnx` beside clipkit.

    python benchmarks/bench_int8.py                 # batch 24, 7 rounds (~2 minutes on 2 CPU cores)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

import clipkit
from clipkit.model.precision import cpu_name, quantize_int8


class ImageTower(torch.nn.Module):
    """`encode_image` as a module, for export and for timing one call."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)


def onnx_sessions(tower: ImageTower, pixels: torch.Tensor, folder: Path, threads: int) -> dict[str, Callable]:
    """ONNX Runtime fp32 and dynamic-int8 sessions of `tower`, as callables on numpy pixels."""
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32, int8 = folder / "tower.onnx", folder / "tower_int8.onnx"
    torch.onnx.export(tower, (pixels,), str(fp32), input_names=["pixels"], output_names=["embedding"],
                      dynamic_axes={"pixels": {0: "batch"}}, dynamo=False, opset_version=17)
    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    sessions = {name: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                for name, path in (("ONNX Runtime fp32", fp32), ("ONNX Runtime int8 (quantize_dynamic)", int8))}
    x = pixels.numpy()
    return {name: (lambda s=s: s.run(None, {"pixels": x})[0]) for name, s in sessions.items()}


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = (v / np.linalg.norm(v, axis=1, keepdims=True) for v in (a, b))
    return float((a * b).sum(1).min())


def run(batch: int, rounds: int, threads: int) -> list[str]:
    """Time every path interleaved; one table row per path."""
    torch.manual_seed(0)
    model = clipkit.create_model("ViT-B-32").eval()
    pixels = torch.randn(batch, 3, 224, 224)
    tower, quantised = ImageTower(model).eval(), ImageTower(quantize_int8(model, ["visual"])).eval()

    def torch_call(m: torch.nn.Module) -> Callable[[], np.ndarray]:
        return lambda: m(pixels).numpy()

    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        paths = {"clipkit fp32 (torch)": torch_call(tower), "clipkit int8 (torch dynamic)": torch_call(quantised),
                 **onnx_sessions(tower, pixels, Path(tmp), threads)}
        outputs = {name: call() for name, call in paths.items()}  # also the warm-up
        times: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(rounds):
            for name, call in paths.items():
                t0 = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - t0)
    base = times["clipkit fp32 (torch)"]
    rows = ["| path | images/s (median) | s min / median / max | speed-up over torch fp32, min / median / max "
            "| min cosine to torch fp32 |", "|---|---|---|---|---|"]
    for name, t in times.items():
        ratios = [b / x for b, x in zip(base, t)]
        rows.append(f"| {name} | {batch / statistics.median(t):.1f} | {min(t):.3f} / {statistics.median(t):.3f} / "
                    f"{max(t):.3f} | {min(ratios):.2f}x / {statistics.median(ratios):.2f}x / {max(ratios):.2f}x | "
                    f"{min_cosine(outputs[name], outputs['clipkit fp32 (torch)']):.5f} |")
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=24)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        import onnx  # noqa: F401 -- the exporter's
        import onnxruntime
    except ImportError:
        sys.exit("bench_int8 needs ONNX Runtime and onnx: pip install onnxruntime onnx")

    print(f"# bench_int8: {cpu_name()}, {args.threads} threads, torch {torch.__version__}, onnxruntime "
          f"{onnxruntime.__version__}; ViT-B-32 image tower, batch {args.batch}, {args.rounds} interleaved rounds\n")
    print("\n".join(run(args.batch, args.rounds, args.threads)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
