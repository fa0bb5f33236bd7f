"""Batched embedding of images and strings to numpy float32 `[N, D]` (used by search, eval and scoring)."""
from __future__ import annotations

import copy
import dataclasses
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import ImageLoadError
from .model.clip import CLIPModel
from .model.precision import autocast, inference_precision, quantize_int8
from .model.tokenizer import Tokenizer
from .model.transforms import Preprocess

ImageLike = Union[str, os.PathLike, bytes, Any]  # path, encoded bytes, or PIL image


def default_device() -> torch.device:
    """CUDA when present (under torchrun, this rank's GPU `cuda:LOCAL_RANK`), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


class Embedder:
    """Embed images and texts with one model; returns L2-normalised float32 numpy arrays.

    `Embedder(path)` loads any format `clipkit.load` accepts; `Embedder(model, preprocess=..., tokenizer=...)`
    wraps a model already in memory. Failed images raise, or with `on_error="nan"` give a NaN row in
    place (so rows never shift) and are listed in `self.failures` as `(index, ImageLoadError)`: the failures
    of the calling thread's last `images()` call, so threads sharing one Embedder never see each other's.
    `precision` (`clipkit.model.precision.inference_precision`): `auto` runs the image tower in bf16 where the
    hardware multiplies bf16 natively, else everything in fp32; `int8` quantises the image tower. Images are
    decoded by `workers` threads (0: in the calling thread) one batch ahead of the model.
    """

    def __init__(
        self,
        model: Union[str, os.PathLike, CLIPModel],
        *,
        preprocess: Optional[Preprocess] = None,
        tokenizer: Optional[Tokenizer] = None,
        device: Union[str, torch.device, None] = None,
        batch_size: int = 64,
        progress: bool = True,
        precision: str = "auto",
        workers: Optional[int] = None,
    ) -> None:
        self.device = torch.device(device) if device is not None else default_device()
        if isinstance(model, CLIPModel):
            if preprocess is None or tokenizer is None:
                raise ValueError("an in-memory model needs preprocess= and tokenizer=")
            self.model, self.preprocess, self.tokenizer = model, preprocess, tokenizer
        else:
            from .formats.auto import load

            self.model, self.preprocess, self.tokenizer = load(model)
        self.model = self.model.to(self.device).eval()
        self.precision = inference_precision(precision, self.device, self.model.visual)  # per tower
        int8 = self.precision.image == "int8"
        self.encoder = quantize_int8(self.model, ["visual", "visual_proj"]) if int8 else self.model  # what runs
        self.batch_size = batch_size
        self.workers = min(8, os.cpu_count() or 1) if workers is None else workers
        self.progress = progress
        self._calls = threading.local()  # per-thread record of the last images() call

    @property
    def failures(self) -> list[tuple[int, ImageLoadError]]:
        """`(index, ImageLoadError)` of this thread's last `images(..., on_error="nan")` call."""
        return getattr(self._calls, "failures", [])

    @failures.setter
    def failures(self, value: list[tuple[int, ImageLoadError]]) -> None:
        self._calls.failures = value

    @property
    def dim(self) -> int:
        return self.model.embed_dim

    def _bar(self, n: int, desc: str) -> tqdm:
        return tqdm(total=n, desc=desc, unit="item", disable=not self.progress or n <= self.batch_size, leave=False)

    @torch.inference_mode()
    def texts(self, strings: Sequence[str]) -> np.ndarray:
        """`[N, D]` text embeddings. Batches hold strings of similar length (row order is kept), so the model's
        cut at each batch's longest sequence leaves little padding."""
        if isinstance(strings, str):
            raise TypeError("texts() takes a list of strings, not a single string")
        out = np.zeros((len(strings), self.dim), np.float32)
        order = sorted(range(len(strings)), key=lambda i: len(strings[i]))
        with self._bar(len(strings), "embed texts") as bar, autocast(self.precision.text, self.device):
            for i in range(0, len(strings), self.batch_size):
                rows = order[i : i + self.batch_size]
                tokens = self.tokenizer([strings[r] for r in rows])
                out[rows] = self.encoder.encode_text(tokens).float().cpu().numpy()
                bar.update(len(rows))
        return out

    @torch.inference_mode()
    def images(self, items: Sequence[ImageLike], on_error: str = "raise") -> np.ndarray:
        """`[N, D]` image embeddings of paths, bytes or PIL images (row i is item i)."""
        if on_error not in ("raise", "nan"):
            raise ValueError("on_error must be 'raise' or 'nan'")
        failures: list[tuple[int, ImageLoadError]] = []
        self.failures = failures  # this thread's record; other threads keep theirs
        out = np.full((len(items), self.dim), np.nan, np.float32)
        starts = range(0, len(items), self.batch_size)
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="clipkit-decode") if self.workers > 0 else None
        try:
            with self._bar(len(items), "embed images") as bar:
                pending = self._submit(items, 0, pool)
                for start in starts:
                    loaded = pending
                    pending = self._submit(items, start + self.batch_size, pool)  # decode ahead of the model
                    idx, pixels = self._collect(start, loaded, on_error, failures)
                    if idx:
                        out[idx] = self.pixels(self.preprocess.normalize(torch.stack(pixels).to(self.device)))
                    bar.update(len(loaded))
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        return out

    @torch.inference_mode()
    def pixels(self, batch: torch.Tensor) -> np.ndarray:
        """`[N, D]` embeddings of preprocessed pixels `[N, 3, S, S]`, in this embedder's precision."""
        with autocast(self.precision.image, self.device):
            return self.encoder.encode_image(batch.to(self.device)).float().cpu().numpy()

    def _load(self, item: ImageLike) -> Union[torch.Tensor, ImageLoadError]:
        """One item decoded and resized to uint8 pixels (normalised per batch); a classified load failure is
        returned (it belongs to the caller's record)."""
        try:
            return self.preprocess.uint8(item)
        except ImageLoadError as e:
            return e

    def _submit(self, items: Sequence[ImageLike], start: int, pool: Optional[ThreadPoolExecutor]) -> list[Any]:
        """The batch at `start`: futures in the pool, or loaded here when there is none (`workers=0`)."""
        batch = [items[i] for i in range(start, min(start + self.batch_size, len(items)))]
        if pool is None:
            return batch  # loaded in `_collect`, in order, on the calling thread
        return [pool.submit(self._load, item) for item in batch]

    def _collect(self, start: int, loaded: list[Any], on_error: str,
                 failures: list[tuple[int, ImageLoadError]]) -> tuple[list[int], list[torch.Tensor]]:
        """Rows and pixels of one batch in item order; failures are recorded (or raised) here, on the caller."""
        idx, pixels = [], []
        for offset, entry in enumerate(loaded):
            result = entry.result() if isinstance(entry, Future) else self._load(entry)
            if isinstance(result, ImageLoadError):
                if on_error == "raise":
                    raise result
                failures.append((start + offset, result))
            else:
                pixels.append(result)
                idx.append(start + offset)
        return idx, pixels


def as_embedder(model: Union[str, os.PathLike, Embedder], *, resize_mode: Optional[str] = None,
                **embedder_kw: Any) -> Embedder:
    """`model` if it is an Embedder, else an Embedder of the model at that path. With `resize_mode`
    (e.g. "longest": letterbox odd sizes) the result is a copy whose preprocessing uses it."""
    embedder = model if isinstance(model, Embedder) else Embedder(model, **embedder_kw)
    if resize_mode is not None:
        embedder = copy.copy(embedder)  # never change the caller's embedder
        embedder._calls = threading.local()
        embedder.preprocess = Preprocess(dataclasses.replace(embedder.preprocess.cfg, resize_mode=resize_mode))
    return embedder
