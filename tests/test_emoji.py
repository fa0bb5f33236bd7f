"""The built-in emoji dataset: columns, caption forms, splits by emoji, art styles from fonts and npm packs (real
tarballs made here), the held-out style, builds without npm or the Noto font, determinism."""
from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from clipkit.data.datasets import build_emoji_dataset
from clipkit.data.datasets import emoji as emoji_mod
from clipkit.data.datasets.emoji import catalog, styles
from clipkit.errors import ClipkitError
from helpers import make_emoji_packs, make_keywords_pack

COLUMNS = ["image", "caption", "label", "group", "emoji", "style", "lang", "form"]
LIMIT = 40
ROWS_PER_IMAGE = 6  # English: name, template, two variants; Korean: name, template


def _build(out: Path, **kw) -> emoji_mod.EmojiSummary:
    kw.setdefault("holdout", None)
    kw.setdefault("packs", out.with_name(out.name + "-no-packs"))  # not the machine's pack cache
    return build_emoji_dataset(out, limit=LIMIT, progress=False, **kw)


def _read(out: Path, splits=("train", "val", "test")) -> dict[str, pd.DataFrame]:
    return {s: pd.read_csv(out / f"{s}.csv", keep_default_na=False, index_col=False) for s in splits}


def _hashes(out: Path) -> dict[str, str]:
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()}


def _no_noto_font(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Noto's font source points at a file that does not exist (CI may have the Debian font installed)."""
    noto = emoji_mod.STYLES["noto"]
    sources = tuple(styles.FontSource(tmp_path / "NotoColorEmoji.ttf", 109) if isinstance(s, styles.FontSource) else s
                    for s in noto.sources)
    monkeypatch.setitem(emoji_mod.STYLES, "noto", styles.Style(sources, noto.license))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, emoji_mod.EmojiSummary]:
    out = tmp_path_factory.mktemp("emoji")
    return out, _build(out, styles=("openmoji",))


@pytest.fixture(scope="module")
def packs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    items = catalog.load_emoji(LIMIT)
    return make_emoji_packs(tmp_path_factory.mktemp("packs"), [e.code for e in items],
                            [catalog.cldr_entry(e)["en"] for e in items])


def test_columns_caption_forms_and_korean(built) -> None:
    out, summary = built
    tables = _read(out)
    for df in tables.values():
        assert list(df.columns) == COLUMNS
        assert (df["caption"] != "").all() and (df["label"] != "").all()
    assert sum(len(df) for df in tables.values()) == summary.total_rows == ROWS_PER_IMAGE * LIMIT
    assert summary.rows_by_lang == {"en": 4 * LIMIT, "ko": 2 * LIMIT}
    assert sum(summary.emoji.values()) == LIMIT and summary.emoji["test"] > 0
    rows = pd.concat(tables.values())
    grinning = rows[rows["emoji"] == "\U0001f600"].set_index(["lang", "form"])["caption"]
    assert grinning["en", "name"] == "grinning face" and grinning["en", "template"] == "a grinning face emoji"
    assert set(grinning["en", "variant"]) == {"an emoji of a grinning face", "a drawing of a grinning face"}
    ko = rows[rows["lang"] == "ko"]
    assert ko["caption"].str.contains("[가-힣]").all()
    assert ko[ko["form"] == "template"]["caption"].str.endswith("이모지").all()
    assert not ko[ko["form"] == "name"]["caption"].str.endswith("이모지").any()
    assert (rows.groupby("image").size() == ROWS_PER_IMAGE).all()  # every image carries every caption form


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


def test_deterministic_and_seeded(tmp_path: Path, packs: Path) -> None:
    kw = {"styles": ("openmoji", "noto", "fluent"), "holdout": "fluent", "packs": packs}
    a, b, c = (_build(tmp_path / n, seed=s, **kw) for n, s in (("a", 3), ("b", 3), ("c", 4)))
    assert _hashes(a.out) == _hashes(b.out)
    test_a = set(_read(a.out)["test"]["emoji"])
    assert test_a != set(_read(c.out)["test"]["emoji"])
    assert sorted(_read(a.out)["train"]["image"].unique()) != sorted(_read(c.out)["train"]["image"].unique())


def test_rerun_overwrites(tmp_path: Path, packs: Path) -> None:
    _build(tmp_path, size=48, styles=("openmoji", "fluent"), holdout="fluent", packs=packs)
    assert (tmp_path / "holdout.csv").exists()
    summary = build_emoji_dataset(tmp_path, limit=10, size=32, styles=("openmoji",), langs=("en",), holdout=None,
                                  packs=packs, progress=False)
    tables = _read(tmp_path)
    assert sum(len(df) for df in tables.values()) == summary.total_rows == 10 * 4
    assert len(list((tmp_path / "images" / "openmoji").glob("*.png"))) == 10
    with Image.open(tmp_path / tables["train"]["image"].iloc[0]) as im:
        assert im.size == (32, 32)
    assert not list(tmp_path.rglob("*.tmp")) and not (tmp_path / "holdout.csv").exists()


def test_styles_from_npm_packs(tmp_path: Path, packs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_noto_font(monkeypatch, tmp_path)
    summary = _build(tmp_path / "out", styles=("openmoji", "noto", "fluent"), packs=packs)
    assert summary.images == {"openmoji": LIMIT, "noto": LIMIT, "fluent": LIMIT} and not summary.skipped_styles
    assert summary.sources["noto"]["source"] == "npm emoji-datasource-google 9.9.9 (emoji-datasource-google-9.9.9.tgz)"
    for style in ("noto", "fluent"):  # each disc/rectangle the pack drew, framed like the font glyphs
        with Image.open(tmp_path / "out" / "images" / style / "1f600.png") as im:
            pixels = np.asarray(im)
        assert im.size == (64, 64) and (pixels != 255).any(axis=-1).mean() > 0.3
    info = json.loads((tmp_path / "out" / "dataset.json").read_text(encoding="utf-8"))
    assert info["styles"]["fluent"]["images"] == LIMIT and "MIT" in info["styles"]["fluent"]["license"]
    assert info["styles"]["noto"]["source"].startswith("npm emoji-datasource-google 9.9.9")


def test_holdout_style_is_never_in_train_val_test(tmp_path: Path, packs: Path) -> None:
    summary = _build(tmp_path, styles=("openmoji", "noto", "fluent"), holdout="fluent", packs=packs)
    tables = _read(tmp_path, ("train", "val", "test", "holdout"))
    assert summary.holdout == "fluent" and summary.holdout_rows == len(tables["holdout"]) == ROWS_PER_IMAGE * LIMIT
    assert all(set(tables[s]["style"]) == {"openmoji", "noto"} for s in ("train", "val", "test"))
    held = tables["holdout"]
    assert set(held["style"]) == {"fluent"} and list(held.columns) == COLUMNS + ["split"]
    by_emoji = pd.concat([tables[s].assign(split=s) for s in ("train", "val", "test")]).groupby("emoji")["split"].first()
    assert (held["split"] == held["emoji"].map(by_emoji)).all()  # each held-out row names its emoji's split
    assert json.loads((tmp_path / "dataset.json").read_text())["holdout"] == {"style": "fluent", "file": "holdout.csv"}


def test_builds_without_npm_or_the_noto_font(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """No pack installed (as on a machine without npm) and no font: OpenMoji alone, with a reason for each style."""
    from clipkit.cli import main

    _no_noto_font(monkeypatch, tmp_path)
    empty = tmp_path / "no-packs"
    empty.mkdir()
    summary = _build(tmp_path / "out", packs=empty, holdout="fluent", styles=emoji_mod.DEFAULT_STYLES)
    assert summary.styles == ["openmoji"] and summary.holdout is None
    assert set(summary.skipped_styles) == {"noto", "facebook", "joypixels", "fluent"}
    assert "npm pack emoji-datasource-google not in" in summary.skipped_styles["noto"]
    assert "font not found" in summary.skipped_styles["noto"]
    assert any("fluent is not installed" in n for n in summary.notes) and not (tmp_path / "out" / "holdout.csv").exists()
    assert main(["data", "emoji", "--out", str(tmp_path / "cli"), "--packs", str(empty), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "style openmoji: 1898 images" in printed and "style fluent skipped: npm pack fluentui-emoji not in" in printed
    assert "note: held-out style fluent is not installed" in printed


def test_pack_versions_and_damage(tmp_path: Path, packs: Path) -> None:
    newer = tmp_path / "packs"
    newer.mkdir()
    (newer / "emoji-datasource-google-10.0.0.tgz").write_bytes((packs / "emoji-datasource-google-9.9.9.tgz").read_bytes())
    (newer / "emoji-datasource-google-9.10.0.tgz").write_bytes(b"not a tarball")
    (newer / "emoji-datasource-google-latest.tgz").write_bytes(b"no version: ignored")
    assert styles.find_pack(newer, "emoji-datasource-google").name == "emoji-datasource-google-10.0.0.tgz"
    (newer / "emoji-datasource-google-10.0.0.tgz").unlink()
    reason = styles.PackSource("emoji-datasource-google", "package/img/google/64/").open(64, newer)
    assert isinstance(reason, str) and reason.startswith("cannot read") and "9.10.0" in reason
    with tarfile.open(packs / "fluentui-emoji-9.9.9.tgz") as tar:
        assert all(m.name.startswith("package/") for m in tar)  # the layout npm pack writes


def test_missing_fonts_are_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_noto_font(monkeypatch, tmp_path)
    summary = _build(tmp_path / "out", styles=("openmoji", "noto"), packs=tmp_path)
    assert "noto" in summary.skipped_styles and "not found" in summary.skipped_styles["noto"]
    assert set(summary.rows_by_style) == {"openmoji"}
    monkeypatch.setitem(emoji_mod.STYLES, "openmoji", styles.Style((styles.FontSource(None),), "-"))
    with pytest.raises(ClipkitError, match="no emoji style"):
        _build(tmp_path / "none", styles=("openmoji", "noto"), packs=tmp_path)


def test_undrawable_glyphs_are_skipped() -> None:
    opened = styles.FontSource(styles._openmoji_font()).open(64, Path("."))
    from PIL import ImageFont

    font = ImageFont.truetype(str(styles._openmoji_font()), 128, layout_engine=ImageFont.Layout.RAQM)
    assert styles.glyph(font, "\U0010fffd") is None  # unmapped: OpenMoji draws a box
    assert styles.glyph(font, " ") is None  # blank
    assert styles.glyph(font, "\U0001f600\u200d\U0001f600") is None  # no ligature: two faces
    assert opened.draw(catalog.load_emoji(1)[0]) is not None


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="styles"):
        _build(tmp_path, styles=("comic",))
    with pytest.raises(ValueError, match="holdout"):
        _build(tmp_path, styles=("openmoji",), holdout="comic")
    with pytest.raises(ValueError, match="languages"):
        _build(tmp_path, langs=("xx",))
    with pytest.raises(ValueError, match="fraction"):
        _build(tmp_path, val_fraction=0.5, test_fraction=0.5)


@pytest.mark.skipif(not styles.STYLES["noto"].sources[1].path.is_file(), reason="Noto Color Emoji font not installed")
def test_noto_font_style(tmp_path: Path) -> None:
    summary = build_emoji_dataset(tmp_path, limit=10, styles=("noto",), langs=("en",), holdout=None,
                                  packs=tmp_path / "none", progress=False)
    assert summary.images == {"noto": 10} and summary.blank_glyphs == {"noto": 0}
    with Image.open(tmp_path / "images" / "noto" / "1f600.png") as im:
        assert im.size == (64, 64) and (np.asarray(im) < 200).any()


@pytest.mark.skipif(any(styles.find_pack(styles.default_packs_dir(), s.package) is None
                        for st in styles.STYLES.values() for s in st.sources if isinstance(s, styles.PackSource)),
                    reason="the npm emoji packs are not installed (scripts/env.sh ensure_emoji_art)")
def test_installed_packs_draw_every_style(tmp_path: Path) -> None:
    summary = build_emoji_dataset(tmp_path, limit=30, holdout="fluent", progress=False)
    assert summary.styles == list(emoji_mod.DEFAULT_STYLES) and not summary.skipped_styles
    assert all(n >= 20 for n in summary.images.values()), summary.images


@pytest.mark.slow
def test_full_build(tmp_path: Path) -> None:
    summary = build_emoji_dataset(tmp_path, progress=False)
    assert summary.total_rows >= 3000 * ROWS_PER_IMAGE and summary.rows_by_lang.get("ko", 0) > 1000
    assert summary.seconds < 180


def test_keyword_captions_from_the_emojibase_pack(tmp_path: Path) -> None:
    """With `keywords` and emojibase-data in the packs folder every image also carries its CLDR keywords per
    language (matched with or without the emoji's FE0F); the card names the source; without the pack a note says
    what is missing."""
    items = catalog.load_emoji(LIMIT)
    tagged = [e for e in items if "\ufe0f" in e.char][:1] + items[:3]
    keywords = {"en": {e.char.replace("\ufe0f", ""): ["face", f"word{i}"] for i, e in enumerate(tagged)},
                "ko": {tagged[0].char: ["얼굴", "미소"]}}
    packs = make_keywords_pack(tmp_path / "packs", keywords)
    plain = _build(tmp_path / "plain", styles=("openmoji",), packs=packs)  # opt-in: the demo does not train on them
    assert plain.total_rows == ROWS_PER_IMAGE * LIMIT and plain.keywords_source is None
    summary = _build(tmp_path / "out", styles=("openmoji",), packs=packs, keywords=True)
    rows = pd.concat(_read(tmp_path / "out").values())
    kw = rows[rows["form"] == "keywords"].drop_duplicates(["emoji", "lang"]).set_index(["emoji", "lang"])["caption"]
    assert len(kw) == len(tagged) + 1 and kw[tagged[0].char, "en"] == "face, word0" and kw[tagged[0].char, "ko"] == \
        "얼굴, 미소"
    assert "\ufe0f" in tagged[0].char and len(rows) == ROWS_PER_IMAGE * LIMIT + len(tagged) + 1
    card = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert card["keywords"] == {"source": "emojibase-data 9.9.9", "emoji": {"en": len(tagged), "ko": 1}}
    assert summary.keywords_source == "emojibase-data 9.9.9" and not summary.notes
    bare = _build(tmp_path / "bare", styles=("openmoji",), keywords=True)
    assert any("no keyword captions: emojibase-data not found" in n for n in bare.notes)
    assert json.loads((tmp_path / "bare" / "dataset.json").read_text())["keywords"] is None
