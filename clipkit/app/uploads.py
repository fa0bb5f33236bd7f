"""Image decoding for the service, with the memory one image may cost bounded before any pixel is decoded.

Uploads are opened with allow-listed Pillow plugins only. JPEGs are decoded at a reduced DCT scale
(`draft`, as `Preprocess` does), then the decoded size is checked against `max_pixels`, and the bytes the
decode will take are estimated and reserved from a `DecodeBudget` shared by every request, so a few
large images at once wait or get 503 instead of adding up. PNG, WebP, GIF and BMP cannot be decoded at a
reduced size in Pillow, so their cap is on the full size.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from PIL import Image, UnidentifiedImageError

from ..errors import ImageLoadError
from ..model.transforms import load_image
from .guard import ApiError

MiB = 1 << 20
DECODE_BYTES_PER_PIXEL = 20  # peak bytes per decoded pixel, with margin: measured 16.4 for I;16, 8.3 for RGBA
PROGRESSIVE_BYTES_PER_PIXEL = 6  # a progressive JPEG keeps every DCT coefficient of the full size (3 at 4:2:0)
JPEG_HEADER_FACTOR = 16  # a JPEG's full size may be this many times max_pixels: draft decodes it smaller
_MAGIC = ((b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"%!PS", "EPS"), (b"\xc5\xd0\xd3\xc6", "EPS"),
          (b"%PDF", "PDF"), (b"8BPS", "PSD"), (b"\x00\x00\x01\x00", "ICO"), (b"\xff\xd8\xff", "JPEG"),
          (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF8", "GIF"), (b"BM", "BMP"))


class DecodeBudget:
    """Bytes of image decoding in flight, across threads: a request reserves its estimate or waits."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit, self.used, self._cond = int(limit_bytes), 0, threading.Condition()

    @contextmanager
    def reserve(self, cost: int, timeout: float) -> Iterator[None]:
        """Hold `cost` bytes of the budget; 413 if it can never fit, 503 if not free within `timeout` s."""
        if cost > self.limit:
            raise ApiError(413, f"image too large to decode here (needs ~{cost // MiB} MiB, the server decodes "
                                f"at most {self.limit // MiB} MiB at once); send a smaller image")
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.used + cost > self.limit:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ApiError(503, "server busy decoding other images, retry shortly", {"retry-after": "1"})
                self._cond.wait(left)
            self.used += cost
        try:
            yield
        finally:
            with self._cond:
                self.used -= cost
                self._cond.notify_all()


def sniff(head: bytes) -> str | None:
    """Format name from magic bytes, only to tell 'not allowed' (415) from 'corrupt' (400)."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    text = head[:512].lstrip().lower()
    if text.startswith(b"<?xml") or b"<svg" in text:
        return "SVG"
    return next((name for magic, name in _MAGIC if head.startswith(magic)), None)


def _open(fp: Any, allowed: tuple[str, ...]) -> Image.Image:
    try:
        return Image.open(fp, formats=list(allowed))
    except Image.DecompressionBombError:
        raise ApiError(413, "image too large (Pillow's decompression bomb limit)") from None
    except UnidentifiedImageError:
        fp.seek(0)
        fmt = sniff(fp.read(1024))
        if fmt in allowed:
            raise ApiError(400, f"corrupt {fmt} image header") from None
        raise ApiError(415, f"unsupported image format {fmt or '(unrecognised)'}; "
                            f"accepted: {', '.join(allowed)}") from None
    except Exception:
        raise ApiError(400, "corrupt image header") from None


def decode_cost(img: Image.Image, full_pixels: int) -> int:
    """Estimated peak bytes to decode `img` (its size after any draft) to RGB; `full_pixels`: before draft."""
    w, h = img.size
    cost = DECODE_BYTES_PER_PIXEL * w * h
    if img.format in ("JPEG", "MPO") and img.info.get("progressive"):
        cost += PROGRESSIVE_BYTES_PER_PIXEL * full_pixels
    return cost


def _check_size(img: Image.Image, full: tuple[int, int], max_pixels: int) -> None:
    (fw, fh), (w, h) = full, img.size
    header_cap = max_pixels * (JPEG_HEADER_FACTOR if img.format in ("JPEG", "MPO") else 1)
    if w * h > max_pixels or fw * fh > header_cap:
        side = int((max_pixels * (fw / max(fh, 1))) ** 0.5)
        raise ApiError(413, f"image too large: {fw}x{fh} pixels; this server decodes at most {max_pixels} pixels "
                            f"(about {side}x{int(side * fh / max(fw, 1))} at this aspect): send it smaller")


def decode_image(fp: Any, allowed: tuple[str, ...], max_pixels: int, budget: DecodeBudget, wait: float,
                 draft: int | None = None) -> tuple[Image.Image, str]:
    """Open `fp` with only the allowed decoders, reduce JPEGs to >= `draft` px, check the size caps, reserve
    the decode's memory from `budget` (waiting up to `wait` s), decode to upright RGB."""
    with _open(fp, allowed) as img:
        fmt, full = img.format or "?", img.size
        if draft and fmt in ("JPEG", "MPO"):
            img.draft("RGB", (draft, draft))
        _check_size(img, full, max_pixels)
        with budget.reserve(decode_cost(img, full[0] * full[1]), wait):
            try:
                out = load_image(img, max_pixels=max_pixels)
            except ImageLoadError as e:
                if e.reason == "too_large":
                    raise ApiError(413, f"image too large: {e.detail}") from None
                raise ApiError(400, f"truncated or corrupt {fmt} image") from None
            return (out.copy() if out is img else out), fmt  # close() would invalidate `img`
