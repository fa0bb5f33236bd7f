"""Decoded-image cache: every distinct image decoded and resized once into a uint8 memmap `[N, S, S, 3]`.

On a CPU, decoding and resizing JPEGs costs more than a small model's step; multi-epoch training reads the
cache instead. A cache is a folder (`header.json`, `pixels.u8`, `valid.npy`, `images.json`) written atomically;
`build` reuses it when the fingerprint (geometry config + every image's path, size and mtime) still matches.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, default_collate
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as F
from tqdm.auto import tqdm

from ..model.config import PreprocessConfig
from .augment import StyleAugment
from .samples import Sample, collate, make_loader, make_sample
from ..errors import DataError, ImageLoadError
from ..fileio import atomic_dir, files_fingerprint, recover_dir, reserve_space
from ..model.tokenizer import Tokenizer
from ..model.transforms import Preprocess

CACHE_VERSION = 1
GEOMETRY = ("image_size", "resize_mode", "interpolation", "fill", "jpeg_draft")  # what the cached pixels depend on


def _geometry(cfg: PreprocessConfig) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k in GEOMETRY}


def fingerprint(paths: Sequence[str], cfg: PreprocessConfig) -> str:
    """What the cached pixels depend on: the geometry config and every image's (path, size, mtime)."""
    return files_fingerprint(paths, extra=_geometry(cfg))


class _Decode(Dataset):
    """Path i -> (i, uint8 [S, S, 3] or None, skip reason or None), for decoding in DataLoader workers."""

    def __init__(self, paths: Sequence[str], cfg: PreprocessConfig) -> None:
        self.paths, self.preprocess = list(paths), Preprocess(cfg, train=False)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, Optional[np.ndarray], Optional[str]]:
        try:
            return i, np.asarray(self.preprocess.image(self.paths[i])), None
        except ImageLoadError as e:
            return i, None, e.reason
        except Exception:  # noqa: BLE001 -- counted, never fatal
            return i, None, "decode_error"


def _as_list(batch: list) -> list:
    return batch


class DecodedCache:
    """Read side of a cache folder: `pixels` memmap, `valid` mask, `skipped` reasons, `rows` (path -> row)."""

    def __init__(self, path: Path, header: dict[str, Any], paths: list[str], skipped: dict[int, str],
                 valid: np.ndarray) -> None:
        self.path, self.header, self.paths, self.skipped, self.valid = path, header, paths, skipped, valid
        self.cfg = PreprocessConfig(**header["cfg"])
        self.fingerprint: str = header["fingerprint"]
        self.rows = {p: i for i, p in enumerate(paths)}
        self._pixels: Optional[np.memmap] = None

    @property
    def pixels(self) -> np.memmap:
        """uint8 [N, S, S, 3], opened lazily so that pickling to DataLoader workers never copies it."""
        if self._pixels is None:
            self._pixels = np.memmap(self.path / "pixels.u8", np.uint8, "r", shape=tuple(self.header["shape"]))
        return self._pixels

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_pixels": None}

    def __len__(self) -> int:
        return len(self.paths)

    @classmethod
    def open(cls, path: Union[str, os.PathLike]) -> "DecodedCache":
        """Open a cache folder written by `build`; a missing, foreign or truncated one raises DataError."""
        path = Path(path)
        recover_dir(path)  # a build killed mid-swap may have left the folder under its `.NAME.old-*` name
        try:
            header = json.loads((path / "header.json").read_text(encoding="utf-8"))
            index = json.loads((path / "images.json").read_text(encoding="utf-8"))
            valid = np.load(path / "valid.npy")
            size = (path / "pixels.u8").stat().st_size
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: not a readable decoded-image cache ({type(e).__name__}: {e})") from None
        if header.get("version") != CACHE_VERSION or size != int(np.prod(header["shape"])) \
                or len(valid) != header["shape"][0] or len(index["paths"]) != len(valid):
            raise DataError(f"{path}: decoded-image cache is corrupt or from another version; rebuild it")
        skipped = {int(k): v for k, v in index["skipped"].items()}
        return cls(path, header, index["paths"], skipped, valid)

    @classmethod
    def build(cls, table: pd.DataFrame, cfg: PreprocessConfig, path: Union[str, os.PathLike], *,
              num_workers: int = 2, progress: bool = True) -> "DecodedCache":
        """Decode each distinct `table["image"]` once into a cache at `path`, unless an up-to-date one is there."""
        paths, path = list(dict.fromkeys(table["image"].astype(str))), Path(path)
        if not paths:
            raise DataError("cannot build a decoded-image cache from an empty table")
        if path.exists() and not (path / "header.json").exists() and (path.is_file() or any(path.iterdir())):
            raise DataError(f"{path}: exists and is not a decoded-image cache; refusing to replace it")
        fp = fingerprint(paths, cfg)
        try:
            old = cls.open(path)
            if old.fingerprint == fp:
                return old
        except DataError:
            pass
        with atomic_dir(path) as tmp:  # fsyncs every file, then renames the folder into place
            valid, skipped = _decode_into(tmp / "pixels.u8", paths, cfg, num_workers, progress)
            np.save(tmp / "valid.npy", valid)
            (tmp / "images.json").write_text(json.dumps({"paths": paths, "skipped": skipped}), encoding="utf-8")
            header = {"version": CACHE_VERSION, "shape": [len(paths), cfg.image_size, cfg.image_size, 3],
                      "cfg": dataclasses.asdict(cfg), "fingerprint": fp}
            (tmp / "header.json").write_text(json.dumps(header, indent=2), encoding="utf-8")
        return cls.open(path)


def _decode_into(file: Path, paths: list[str], cfg: PreprocessConfig, num_workers: int,
                 progress: bool) -> tuple[np.ndarray, dict[int, str]]:
    """Fill a new memmap at `file` with the decoded images; return the valid mask and skip reasons by row.
    The file's space is reserved first: writing a sparse map on a full disk would kill the process (SIGBUS)."""
    s = cfg.image_size
    reserve_space(file, len(paths) * s * s * 3)
    pixels = np.memmap(file, np.uint8, "r+", shape=(len(paths), s, s, 3))
    valid, skipped = np.zeros(len(paths), dtype=bool), {}
    loader = make_loader(_Decode(paths, cfg), 32, num_workers=num_workers, collate_fn=_as_list, pin_memory=False)
    for batch in tqdm(loader, desc="decoding images", unit="batch", disable=not progress):
        for i, arr, reason in batch:
            if arr is None:
                skipped[i] = reason
            else:
                pixels[i], valid[i] = arr, True
    pixels.flush()
    del pixels
    return valid, skipped


class CachedPairDataset(Dataset):
    """PairDataset's samples, read from a DecodedCache: uint8 -> normalised float, plus a random crop in train,
    or `style`'s whole augmentation (background, colour, grey-scale, blur, crop) when it is given.

    With `style`, an item holds its uint8 pixels and its `StyleDraw`, and the dataset's `collate` augments and
    normalises the whole batch at once; load it with `collate_fn=dataset.collate`."""

    def __init__(self, table: pd.DataFrame, cache: DecodedCache, tokenizer: Optional[Tokenizer], cfg: PreprocessConfig,
                 train: bool = False, style: Optional[StyleAugment] = None) -> None:
        if _geometry(cfg) != _geometry(cache.cfg):
            raise DataError(f"{cache.path}: cache built for {_geometry(cache.cfg)}, not {_geometry(cfg)}; rebuild")
        rows = table["image"].astype(str).map(cache.rows)
        if rows.isna().any():
            missing = table["image"][rows.isna()].iloc[0]
            raise DataError(f"{cache.path}: {int(rows.isna().sum())} table image(s) not in the cache "
                            f"(first: {missing}); rebuild it with DecodedCache.build")
        self.rows = rows.to_numpy(dtype=np.int64)
        self.images, self.captions = table["image"].astype("str").array, table["caption"].astype("str").array
        self.cache, self.tokenizer, self.cfg, self.train = cache, tokenizer, cfg, train
        ratio = (3 / 4, 4 / 3) if cfg.resize_mode == "shortest" else (1.0, 1.0)  # as Preprocess(train=True)
        self.crop = T.RandomResizedCrop(cfg.image_size, scale=(0.8, 1.0), ratio=ratio, antialias=True)
        self.style = style

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Sample:
        row = int(self.rows[i])
        if not self.cache.valid[row]:
            return {"skip": (str(self.images[i]), self.cache.skipped.get(row, "decode_error")), "index": int(i)}
        x = torch.from_numpy(np.array(self.cache.pixels[row])).permute(2, 0, 1)  # [S, S, 3] -> [3, S, S] uint8
        if self.style is not None:
            return {**make_sample(x, str(self.captions[i]), self.tokenizer, int(i)), "style": self.style.draw(x, row)}
        if self.train:
            x = self.crop(x)
        return make_sample(self._normalize(F.to_dtype(x, torch.float32, scale=True)), str(self.captions[i]),
                           self.tokenizer, int(i))

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, list(self.cfg.mean), list(self.cfg.std))

    def collate(self, batch: Sequence[Sample]) -> dict[str, Any]:
        """`samples.collate`, and with `style` the batch's augmentation (its items' draws) and normalisation."""
        good = [b for b in batch if "pixels" in b]
        draws = default_collate([b["style"] for b in good]) if good and self.style is not None else None
        out = collate(batch)
        if draws is not None:
            out["pixels"] = self._normalize(self.style.apply(out["pixels"], draws))
        return out
