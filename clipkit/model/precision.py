"""The one place that decides which precision a model runs in: `auto` follows the hardware.

`auto` is bf16 autocast on CUDA and on CPUs with native bf16 matmul (AVX-512 BF16 or AMX), fp32 elsewhere: on a
CPU without them bf16 runs 10-100x slower than fp32. Training autocasts the whole step; inference runs the image
tower in bf16 and keeps the text tower in fp32 (`inference_precision`, with the measurement behind it). `int8`
(opt-in, CPU only) is dynamic quantisation of the image tower's Linear layers. Whatever runs inside, embeddings
leave the model as float32 and L2-normalised (`CLIPModel`).
"""
from __future__ import annotations

import contextlib
import copy
import platform
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, ContextManager, Optional, Sequence, Union

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def _cpuinfo_field(*names: str) -> str:
    """The first value of one of `names` in /proc/cpuinfo ("" where there is none, e.g. not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in names:
            return value.strip()
    return ""


def _proc_cpuinfo_flags() -> set[str]:
    return set(_cpuinfo_field("flags", "Features").split())


def cpu_name() -> str:
    """The CPU's model name, e.g. "AMD EPYC" (/proc/cpuinfo; the platform's word for it elsewhere)."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when this CPU multiplies bf16 natively (AVX-512 BF16 or AMX-BF16), from torch's CPU capability
    info, else from /proc/cpuinfo's flags (torch builds without `torch.cpu.get_capabilities`)."""
    caps = getattr(torch.cpu, "get_capabilities", None)
    if caps is not None:
        try:
            found = caps()
            return any(bool(found.get(flag)) for flag in _BF16_FLAGS)
        except Exception:  # noqa: BLE001 - an unusual build: fall back to the kernel's flags
            pass
    return any(flag in _proc_cpuinfo_flags() for flag in _BF16_FLAGS)


def resolve_precision(precision: str, device: Union[str, torch.device]) -> str:
    """`fp32`, `bf16`, `fp16` or `int8` for `precision` on `device` (`auto`: what the hardware is fast at)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    kind = torch.device(device).type
    if precision == "int8" and kind != "cpu":
        raise ValueError(f"precision='int8' (dynamic quantisation) runs on the CPU only, not on {kind}")
    if precision != "auto":
        return precision
    if kind == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if kind == "cpu" and cpu_has_native_bf16():
        return "bf16"
    return "fp32"


def training_precision(precision: str, device: Union[str, torch.device]) -> str:
    """`fp32` or `bf16` (autocast over the whole step) for training; `auto` as in `resolve_precision`. fp16 would
    need a gradient scaler and int8 cannot train, so both are refused."""
    resolved = resolve_precision(precision, device)
    if resolved not in ("fp32", "bf16"):
        raise ValueError(f"training runs in fp32 or bf16 (or auto), not {precision!r}")
    return resolved


@dataclass(frozen=True)
class TowerPrecision:
    """The resolved precision of each tower for inference."""

    image: str
    text: str


def inference_precision(precision: str, device: Union[str, torch.device],
                        image_tower: Optional[nn.Module] = None) -> TowerPrecision:
    """Per tower: `auto` runs the image tower in bf16 where the hardware is fast at it and the text tower in fp32
    (whole-model bf16 moved text-to-image neighbours too far: recall@10 0.979 vs fp32 on the ViT demo model, 0.993
    this way; text batches are short once padding is cut). An image tower with BatchNorm layers (EfficientNet,
    ResNet) stays fp32 under `auto`: in bf16 the EfficientNet-Lite0 demo model's recall@10 fell to 0.935. `int8`
    quantises the image tower only: dynamic int8 broke the MiniLM text tower (cosine to fp32 down to 0.43).
    Measured by `benchmarks/bench_precision.py`."""
    resolved = resolve_precision(precision, device)
    if precision == "auto":
        batch_norm = image_tower is not None and has_batch_norm(image_tower)
        return TowerPrecision(image="fp32" if batch_norm else resolved, text="fp32")
    if resolved == "int8":
        return TowerPrecision(image=resolved, text="fp32")
    return TowerPrecision(image=resolved, text=resolved)


def has_batch_norm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def hardware_summary(device: Union[str, torch.device], image_tower: Optional[nn.Module] = None) -> dict[str, Any]:
    """What `auto` found on `device` and chose: the processor, torch's threads, native bf16 and the resolved
    precisions. Trained figures depend on it (bf16 and fp32 runs of the same seed differ), so the demo records it."""
    dev = torch.device(device)
    towers = inference_precision("auto", dev, image_tower)
    return {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name(),
            "threads": torch.get_num_threads(),
            "native_bf16": torch.cuda.is_bf16_supported() if dev.type == "cuda" else cpu_has_native_bf16(),
            "train_precision": training_precision("auto", dev),
            "image_precision": towers.image, "text_precision": towers.text}


def autocast(precision: str, device: Union[str, torch.device]) -> ContextManager:
    """The autocast context for a resolved precision (none for fp32 and int8)."""
    dtype = _AUTOCAST.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def training_autocast(precision: str, device: Union[str, torch.device]) -> ContextManager:
    """`autocast` for a training step. On CPU in bf16 it also runs attention on SDPA's math backend: torch's CPU
    flash-attention backward is slow in bf16 (the `tiny` ViT's step took 0.52-0.65 s with it, 0.33 s without;
    fp32 0.66 s), while the math path is a few matmuls that bf16 speeds up (`benchmarks/bench_train.py`)."""
    cast = autocast(precision, device)
    if precision != "bf16" or torch.device(device).type != "cpu":
        return cast
    stack = contextlib.ExitStack()
    stack.enter_context(cast)
    stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
    return stack


def quantize_int8(model: nn.Module, submodules: Sequence[str]) -> nn.Module:
    """A copy of `model` whose Linear layers inside `submodules` (names, e.g. "visual") run dynamically quantised
    int8: int8 weights, activations quantised per batch. The original is not changed. CPU inference only."""
    spec = {name: torch.ao.quantization.default_dynamic_qconfig for name in submodules}
    with warnings.catch_warnings():  # torch's deprecation notice for the eager-mode quantisation API
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=UserWarning)
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model).cpu().eval(), spec, dtype=torch.qint8)
