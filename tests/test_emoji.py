"""The built-in emoji dataset: columns, paths, splits by emoji, Korean captions, determinism."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from clipkit.data.datasets import build_emoji_dataset
from clipkit.data.datasets import emoji as emoji_mod
from clipkit.errors import ClipkitError

COLUMNS = ["image", "caption", "label", "group", "emoji", "style", "lang"]
LIMIT = 40


def _build(out: Path, **kw) -> emoji_mod.EmojiSummary:
    return build_emoji_dataset(out, limit=LIMIT, progress=False, **kw)


def _read(out: Path) -> dict[str, pd.DataFrame]:
    return {s: pd.read_csv(out / f"{s}.csv", keep_default_na=False, index_col=False)
            for s in ("train", "val", "test")}


def _hashes(out: Path) -> dict[str, str]:
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, emoji_mod.EmojiSummary]:
    out = tmp_path_factory.mktemp("emoji")
    return out, _build(out, styles=("openmoji",))


def test_columns_counts_and_korean(built) -> None:
    out, summary = built
    tables = _read(out)
    for df in tables.values():
        assert list(df.columns) == COLUMNS
        assert (df["caption"] != "").all() and (df["label"] != "").all()
    assert sum(len(df) for df in tables.values()) == summary.total_rows == 2 * LIMIT
    assert summary.rows_by_lang == {"en": LIMIT, "ko": LIMIT}
    assert sum(summary.emoji.values()) == LIMIT and summary.emoji["test"] > 0
    train = tables["train"]
    ko = train[train["lang"] == "ko"]["caption"]
    assert len(ko) and ko.str.contains("[가-힣]").all() and ko.str.endswith("이모지").all()
    assert "a grinning face emoji" in set(train["caption"]) | set(tables["val"]["caption"]) | set(
        tables["test"]["caption"])
    assert (out / "dataset.json").is_file()


def test_zero_shot_templates_are_shipped_with_the_dataset(built) -> None:
    from clipkit.evaluate.zeroshot import DEFAULT_TEMPLATES, load_templates

    out, _ = built
    info = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    assert load_templates(out / info["templates"]) == emoji_mod.TEMPLATES
    assert "an emoji of {}." in emoji_mod.TEMPLATES and emoji_mod.TEMPLATES != DEFAULT_TEMPLATES


def test_images_resolve_and_are_not_blank(built) -> None:
    out, _ = built
    for df in _read(out).values():
        for rel in df["image"].unique():
            assert not Path(rel).is_absolute() and rel.startswith("images/openmoji/")
            with Image.open(out / rel) as im:
                assert im.mode == "RGB" and im.size == (64, 64)
                pixels = np.asarray(im)
            assert (pixels < 200).any(axis=-1).mean() > 0.05  # a drawn glyph, not a white square


def test_split_by_emoji(built) -> None:
    out, summary = built
    sets = {s: set(df["emoji"]) for s, df in _read(out).items()}
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"])
    assert not (sets["val"] & sets["test"])
    labels = {s: set(df["label"]) for s, df in _read(out).items()}
    assert summary.test_labels == len(labels["test"])
    assert summary.test_labels_in_train == len(labels["test"] & labels["train"])


def test_deterministic_and_seeded(tmp_path: Path) -> None:
    a, b, c = (_build(tmp_path / n, seed=s, styles=("openmoji",)) for n, s in (("a", 3), ("b", 3), ("c", 4)))
    assert _hashes(a.out) == _hashes(b.out)
    test_a = set(_read(a.out)["test"]["emoji"])
    assert test_a != set(_read(c.out)["test"]["emoji"])
    assert sorted(_read(a.out)["train"]["image"].unique()) != sorted(_read(c.out)["train"]["image"].unique())


def test_rerun_overwrites(tmp_path: Path) -> None:
    _build(tmp_path, size=48, styles=("openmoji",))
    summary = build_emoji_dataset(tmp_path, limit=10, size=32, styles=("openmoji",), langs=("en",),
                                  progress=False)
    tables = _read(tmp_path)
    assert sum(len(df) for df in tables.values()) == summary.total_rows == 10
    assert len(list((tmp_path / "images" / "openmoji").glob("*.png"))) == 10
    with Image.open(tmp_path / tables["train"]["image"].iloc[0]) as im:
        assert im.size == (32, 32)
    assert not list(tmp_path.rglob("*.tmp"))


def test_missing_font_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(emoji_mod.STYLES, "noto", emoji_mod.FontStyle(tmp_path / "nope.ttf", 109))
    summary = _build(tmp_path / "out", styles=("openmoji", "noto"))
    assert "noto" in summary.skipped_styles and "not found" in summary.skipped_styles["noto"]
    assert set(summary.rows_by_style) == {"openmoji"}
    monkeypatch.setitem(emoji_mod.STYLES, "openmoji", emoji_mod.FontStyle(None))
    with pytest.raises(ClipkitError, match="no emoji style"):
        _build(tmp_path / "none", styles=("openmoji", "noto"))


def test_undrawable_glyphs_are_skipped() -> None:
    font = emoji_mod._load_font("openmoji", 64)
    assert emoji_mod.render(font, "\U0010fffd", 64) is None  # unmapped: OpenMoji draws a box
    assert emoji_mod.render(font, " ", 64) is None  # blank
    assert emoji_mod.render(font, "\U0001f600\u200d\U0001f600", 64) is None  # no ligature: two faces
    assert emoji_mod.render(font, "\U0001f600", 64) is not None


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="styles"):
        _build(tmp_path, styles=("comic",))
    with pytest.raises(ValueError, match="languages"):
        _build(tmp_path, langs=("xx",))
    with pytest.raises(ValueError, match="fraction"):
        _build(tmp_path, val_fraction=0.5, test_fraction=0.5)


@pytest.mark.skipif(not emoji_mod.STYLES["noto"].path.is_file(), reason="Noto Color Emoji not installed")
def test_noto_style(tmp_path: Path) -> None:
    summary = build_emoji_dataset(tmp_path, limit=10, styles=("noto",), langs=("en",), progress=False)
    assert summary.images == {"noto": 10} and summary.blank_glyphs == {"noto": 0}
    with Image.open(tmp_path / "images" / "noto" / "1f600.png") as im:
        assert im.size == (64, 64) and (np.asarray(im) < 200).any()


@pytest.mark.slow
def test_full_build(tmp_path: Path) -> None:
    summary = build_emoji_dataset(tmp_path, progress=False)
    assert summary.total_rows >= 3000 and summary.rows_by_lang.get("ko", 0) > 1000
    assert summary.seconds < 120
