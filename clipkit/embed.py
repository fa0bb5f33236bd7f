"""Batched embedding of images and strings to numpy float32 `[N, D]` (used by search, eval and scoring)."""
from __future__ import annotations

import copy
import dataclasses
import os
import threading
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import ImageLoadError
from .model.clip import CLIPModel
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
        self.batch_size = batch_size
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
        """`[N, D]` text embeddings."""
        if isinstance(strings, str):
            raise TypeError("texts() takes a list of strings, not a single string")
        out = np.zeros((len(strings), self.dim), np.float32)
        with self._bar(len(strings), "embed texts") as bar:
            for i in range(0, len(strings), self.batch_size):
                tokens = self.tokenizer(list(strings[i : i + self.batch_size]))
                out[i : i + len(tokens["input_ids"])] = self.model.encode_text(tokens).float().cpu().numpy()
                bar.update(len(tokens["input_ids"]))
        return out

    @torch.inference_mode()
    def images(self, items: Sequence[ImageLike], on_error: str = "raise") -> np.ndarray:
        """`[N, D]` image embeddings of paths, bytes or PIL images (row i is item i)."""
        if on_error not in ("raise", "nan"):
            raise ValueError("on_error must be 'raise' or 'nan'")
        failures: list[tuple[int, ImageLoadError]] = []
        self.failures = failures  # this thread's record; other threads keep theirs
        out = np.full((len(items), self.dim), np.nan, np.float32)
        with self._bar(len(items), "embed images") as bar:
            for start in range(0, len(items), self.batch_size):
                idx, pixels = self._load_batch(items, start, on_error, failures)
                if idx:
                    batch = torch.stack(pixels).to(self.device)
                    out[idx] = self.model.encode_image(batch).float().cpu().numpy()
                bar.update(min(self.batch_size, len(items) - start))
        return out

    def _load_batch(self, items: Sequence[ImageLike], start: int, on_error: str,
                    failures: list[tuple[int, ImageLoadError]]) -> tuple[list[int], list[torch.Tensor]]:
        idx, pixels = [], []
        for i in range(start, min(start + self.batch_size, len(items))):
            try:
                pixels.append(self.preprocess(items[i]))
                idx.append(i)
            except ImageLoadError as e:
                if on_error == "raise":
                    raise
                failures.append((i, e))
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
