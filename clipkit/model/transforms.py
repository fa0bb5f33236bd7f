"""Robust image loading (EXIF, alpha, CMYK, 16-bit, bombs) and resize/crop/pad preprocessing to `[3, S, S]`.

`load_image` turns any path, bytes or PIL image into an RGB PIL image or raises `ImageLoadError` with a
reason for skip counters. `Preprocess` maps it to a normalised tensor. In `shortest` mode it matches
open_clip's val transform (torchvision Resize + CenterCrop on PIL) bit for bit on decoded images, because it
uses the same PIL resampler. One difference: JPEG files at least twice the target size are decoded at a
reduced DCT scale (Pillow's `draft`), which is several times faster; their pixels then differ from a full
decode + resize by about 0.01-0.02 (mean, normalised units). `PreprocessConfig(jpeg_draft=False)` turns it off.
"""
from __future__ import annotations

import contextlib
import io
import os
import warnings
from typing import Iterator, Sequence, Union

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as F

from .config import PreprocessConfig
from ..errors import ImageLoadError

DEFAULT_MAX_PIXELS = 64_000_000  # below Pillow's 89.5M warning tier, so clipkit rejects first
BLOCKED_FORMATS = frozenset({"EPS"})  # Pillow runs Ghostscript to decode EPS: never on untrusted input
INTERPOLATIONS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}
_EXACT_MAX_SIDE = 8  # shortest mode: intermediates up to 8 S long are resized whole, exactly like torchvision
_INT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")

# Pillow warns about metadata it cannot parse (EXIF, TIFF tags, APNG, MPO, ICO sizes, XMP without defusedxml) and
# about images over its own pixel limit; `load_image` already treats such metadata as absent and enforces its own
# cap. These filters are installed once here: `warnings.catch_warnings()` per call is process-global and not
# thread-safe (concurrent decodes left an "ignore" at the front of the filter list, hiding every later warning).
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.\w+ImagePlugin\Z")
warnings.filterwarnings("ignore", message="XMP data cannot be read without defusedxml", module=r"PIL\.Image\Z")
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning, module=r"PIL\.Image\Z")

ImageSource = Union[str, os.PathLike, bytes, Image.Image]
Box = tuple[float, float, float, float]


def _describe(src: ImageSource) -> str:
    if isinstance(src, (bytes, bytearray)):
        return "<bytes>"
    if isinstance(src, Image.Image):
        return "<PIL image>"
    return os.fspath(src)


def _allowed_formats() -> list[str]:
    Image.init()
    return [f for f in Image.ID if f not in BLOCKED_FORMATS]


@contextlib.contextmanager
def _opened(src: ImageSource, name: str) -> Iterator[Image.Image]:
    """Open `src` lazily (header only); file handles are closed on exit, a caller's PIL image never is."""
    if isinstance(src, Image.Image):
        yield src
        return
    fp = io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else os.fspath(src)
    try:
        img = Image.open(fp, formats=_allowed_formats())
    except Image.DecompressionBombError as e:  # not an OSError: catch it first
        raise ImageLoadError(name, "too_large", str(e)) from None
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
        raise ImageLoadError(name, "missing", e.strerror or type(e).__name__) from None
    except UnidentifiedImageError:
        raise ImageLoadError(name, "unidentified", "not a supported image format") from None
    except Exception as e:  # identified, but the header is broken
        raise ImageLoadError(name, "decode_error", f"{type(e).__name__}: {e}") from None
    with img:
        yield img


def _exif_upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF/XMP orientation; broken metadata is ignored, never fatal."""
    try:
        if img.getexif().get(ExifTags.Base.Orientation, 1) in (2, 3, 4, 5, 6, 7, 8):
            return ImageOps.exif_transpose(img)
    except Exception:
        pass
    return img


def _int_to_l(img: Image.Image) -> Image.Image:
    """16/32-bit integer grey -> 8-bit by scaling (v / 257), not clipping; out-of-16-bit data by min/max."""
    a = np.asarray(img).astype(np.float32)
    lo, hi = float(a.min()), float(a.max())
    a = a / 257.0 if lo >= 0 and hi <= 65535 else (a - lo) * (255.0 / max(hi - lo, 1e-12))
    return Image.fromarray(np.rint(a).clip(0, 255).astype(np.uint8), "L")


def _float_to_l(img: Image.Image) -> Image.Image:
    """Float grey -> 8-bit: data already in [0, 1] is taken as normalised (x 255), else min/max-scaled."""
    a = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(a.min()), float(a.max())
    a = a * 255.0 if lo >= 0 and hi <= 1 else (a - lo) * (255.0 / max(hi - lo, 1e-12))
    return Image.fromarray(np.rint(a).clip(0, 255).astype(np.uint8), "L")


def _to_rgb(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Any Pillow mode -> RGB; transparency is composited on `background` so hidden colours never leak."""
    if img.mode in _INT_MODES:
        img = _int_to_l(img)
    elif img.mode == "F":
        img = _float_to_l(img)
    if img.mode in _ALPHA_MODES or img.has_transparency_data:
        rgba = img if img.mode == "RGBA" else img.convert("RGBA")
        out = Image.new("RGB", rgba.size, background)
        out.paste(rgba, mask=rgba)  # in place, bit-equal to alpha_composite, without full-size RGBA copies
        return out
    return img if img.mode == "RGB" else img.convert("RGB")


def load_image(
    src: ImageSource,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    background: tuple[int, int, int] = (255, 255, 255),
    min_size: int | None = None,
) -> Image.Image:
    """Decode `src` (path, bytes or PIL image) into an upright RGB image, or raise a classified ImageLoadError.

    The pixel cap is checked from the header before decoding. Animated images give their first frame.
    With `min_size`, large JPEGs are decoded at a reduced scale whose shorter side stays >= `min_size`.
    An upright RGB PIL image given as `src` is returned as is, not copied.
    """
    name = _describe(src)
    with _opened(src, name) as img:
        w, h = img.size
        if w * h > max_pixels:
            raise ImageLoadError(name, "too_large", f"{w}x{h} pixels exceeds max_pixels={max_pixels}")
        if min_size and img.format in ("JPEG", "MPO") and not isinstance(src, Image.Image):
            img.draft("RGB", (min_size, min_size))
        try:
            img.load()  # force the full decode: truncation only shows here (verify() misses it)
            return _to_rgb(_exif_upright(img), background)
        except Image.DecompressionBombError as e:
            raise ImageLoadError(name, "too_large", str(e)) from None
        except MemoryError:
            raise ImageLoadError(name, "too_large", "out of memory while decoding") from None
        except Exception as e:
            raise ImageLoadError(name, "decode_error", f"{type(e).__name__}: {e}") from None


def _resize_shortest(img: Image.Image, size: int, resample: int) -> Image.Image:
    """torchvision's Resize(size) + CenterCrop(size), bit-exact; extreme aspects resample only the kept region."""
    w, h = img.size
    new_w, new_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)  # torchvision truncates
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    if max(new_w, new_h) <= _EXACT_MAX_SIDE * size:
        return img.resize((new_w, new_h), resample).crop((left, top, left + size, top + size))
    # A source box avoids a huge intermediate (1x10000 -> 224x2240000) but Pillow may then run its two
    # passes in the other order, so pixels can differ from torchvision by one level
    sx, sy = w / new_w, h / new_h
    return img.resize((size, size), resample, box=(left * sx, top * sy, (left + size) * sx, (top + size) * sy))


def _fit(img: Image.Image, box: Box, mode: str, size: int, resample: int, fill: tuple[int, int, int]) -> Image.Image:
    """Resample the `box` region of `img` to `size` x `size` by the resize `mode`."""
    if mode == "squash":
        return img.resize((size, size), resample, box=box)
    if mode == "shortest":  # only used in eval, where `box` is the whole image
        return _resize_shortest(img, size, resample)
    w, h = box[2] - box[0], box[3] - box[1]  # longest: fit inside, then letterbox with `fill`
    scale = size / max(w, h)
    new_w, new_h = max(1, min(size, round(w * scale))), max(1, min(size, round(h * scale)))
    out = Image.new("RGB", (size, size), fill)
    out.paste(img.resize((new_w, new_h), resample, box=box), ((size - new_w) // 2, (size - new_h) // 2))
    return out


class Preprocess:
    """Image (PIL, path or bytes) -> normalised float tensor [3, S, S]; picklable for DataLoader workers.

    train=True adds a random crop of 80-100 % of the area (RandomResizedCrop in `shortest` mode; an
    aspect-keeping zoom in `longest`/`squash`). No flips: captions may say left or right.
    """

    def __init__(self, cfg: PreprocessConfig, train: bool = False) -> None:
        if cfg.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {cfg.interpolation!r}")
        self.cfg = cfg
        self.train = train

    def __repr__(self) -> str:
        return f"Preprocess({self.cfg!r}, train={self.train})"

    def _box(self, img: Image.Image) -> Box:
        if not self.train:
            return (0.0, 0.0, float(img.width), float(img.height))
        aspect = img.width / img.height
        ratio = [3 / 4, 4 / 3] if self.cfg.resize_mode == "shortest" else [aspect, aspect]
        top, left, h, w = T.RandomResizedCrop.get_params(img, scale=[0.8, 1.0], ratio=ratio)
        return (float(left), float(top), float(left + w), float(top + h))

    def image(self, image: ImageSource) -> Image.Image:
        """The resized RGB PIL image, before tensor conversion (for previews and debugging)."""
        cfg = self.cfg
        img = load_image(image, background=cfg.fill, min_size=cfg.image_size if cfg.jpeg_draft else None)
        # RandomResizedCrop resamples its crop straight to S x S, which is `squash` applied to the box
        mode = "squash" if self.train and cfg.resize_mode == "shortest" else cfg.resize_mode
        return _fit(img, self._box(img), mode, cfg.image_size, INTERPOLATIONS[cfg.interpolation], cfg.fill)

    def __call__(self, image: ImageSource) -> torch.Tensor:
        return self.normalize(self.uint8(image))

    def uint8(self, image: ImageSource) -> torch.Tensor:
        """The resized image as uint8 `[3, S, S]`: the per-item part, for decode threads."""
        return F.pil_to_tensor(self.image(image))

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 `[..., 3, S, S]` -> the model's normalised float pixels; one call for a whole batch is cheaper
        than one per item (the same element-wise operations, so the values are identical)."""
        x = F.to_dtype(pixels, torch.float32, scale=True)  # [0, 255] -> [0, 1]
        return F.normalize(x, list(self.cfg.mean), list(self.cfg.std))

    def batch(self, items: Sequence[ImageSource]) -> torch.Tensor:
        """Stack preprocessed items into [N, 3, S, S]; any bad item raises its ImageLoadError."""
        s = self.cfg.image_size
        if not items:
            return torch.empty(0, 3, s, s)
        return self.normalize(torch.stack([self.uint8(item) for item in items]))
