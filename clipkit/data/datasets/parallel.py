"""Parallel text from the `emoji` package: each emoji's English name beside its name in another language,
plus single words aligned across names by co-occurrence ("사과" / "apple" from "빨간 사과" / "red apple" and
"초록 사과" / "green apple"), and word stems aligned the same way ("윙크" / "winking" from "윙크하는 얼굴" and
"윙크하면서 ..."). This is the training data for distilling a text tower into other languages.
With CLDR keywords (`emoji.keywords.load_keywords`) each emoji's keyword lists are paired too, and their
keywords aligned the same way ("고양이" / "cat" from the keywords of every cat emoji).

Needs no download: `emoji` ships names in 14 languages. Names of emoji passed in `exclude` (e.g. a test
split's concepts) are left out, and so are words aligned only through them.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence, Union

import emoji as emoji_pkg
import pandas as pd

from ...errors import ClipkitError
from ...fileio import atomic_path

LANGUAGES = tuple(lang for lang in emoji_pkg.LANGUAGES if lang != "en")
SPACED = frozenset(LANGUAGES) - {"ja", "zh"}  # languages whose emoji names separate words with spaces
SKIN_TONES = frozenset(chr(c) for c in range(0x1F3FB, 0x1F400))
COLUMNS = ("en", "text", "lang", "kind", "emoji")


@dataclass
class ParallelSummary:
    """What `build_parallel` wrote: pairs by language and kind, and how many were held out by `exclude`."""

    path: str
    pairs: dict[str, int] = field(default_factory=dict)  # "lang/kind" -> rows
    excluded_names: int = 0

    @property
    def total(self) -> int:
        return sum(self.pairs.values())


def unqualified(char: str) -> str:
    """An emoji without its variation selectors: "✈️" and "✈" are one concept, and the `emoji` package, the
    emoji catalogue and the image packs each qualify some emoji differently."""
    return char.replace("\ufe0f", "").replace("\ufe0e", "")


def _clean(name: str) -> str:
    return " ".join(name.strip(":").replace("_", " ").split())


def emoji_names(langs: Sequence[str] = ("ko",), exclude: Iterable[str] = ()) -> pd.DataFrame:
    """One row per (emoji, language): columns en, text, lang, kind="name", emoji. Skin-tone variants are skipped."""
    unknown = sorted(set(langs) - set(LANGUAGES))
    if unknown:
        raise ClipkitError(f"no emoji names in {unknown}; available: {', '.join(LANGUAGES)}")
    skip = {unqualified(c) for c in exclude}
    rows = []
    for lang in langs:
        emoji_pkg.config.load_language(lang)
        for char, data in emoji_pkg.EMOJI_DATA.items():
            if unqualified(char) in skip or SKIN_TONES.intersection(char) or lang not in data or "en" not in data:
                continue
            rows.append((_clean(data["en"]).lower(), _clean(data[lang]).lower(), lang, "name", char))
    return pd.DataFrame(rows, columns=list(COLUMNS)).drop_duplicates(["en", "text", "lang"], ignore_index=True)


def keyword_pairs(keywords: dict[str, dict[str, str]], langs: Sequence[str], exclude: Iterable[str] = ()) -> pd.DataFrame:
    """One row per (emoji, language) with keywords in both: en = the English keyword list, kind="keywords"."""
    skip, english = {unqualified(c) for c in exclude}, keywords.get("en", {})
    rows = [(english[char], text, lang, "keywords", char) for lang in langs
            for char, text in keywords.get(lang, {}).items() if char in english and unqualified(char) not in skip]
    return pd.DataFrame(rows, columns=list(COLUMNS)).drop_duplicates(["en", "text", "lang"], ignore_index=True)


def _words(text: str) -> set[str]:
    return set(text.split())


def _keywords(text: str) -> set[str]:
    return {k.strip() for k in text.split(",") if k.strip()}


def word_stems(text: str, shortest: int = 2) -> set[str]:
    """Every proper prefix of at least `shortest` characters of each word (윙크하는 -> 윙크, 윙크하)."""
    return {w[:k] for w in text.split() for k in range(shortest, len(w))}


def align_words(names: pd.DataFrame, min_count: int = 2, min_dice: float = 0.5, units=_words,
                langs: Iterable[str] = SPACED, x_units=None, kind: str = "word") -> pd.DataFrame:
    """Single-word pairs: for each word of a spaced language, the English word whose name sets it shares best.

    Dice(w, e) = 2 c(w, e) / (c(w) + c(e)) over names; a pair is kept when it appears in at least `min_count`
    names, its Dice is at least `min_dice`, and no other English word ties with it. `units` splits a text into
    what is aligned (words; for keyword lists, the keywords); `x_units`, if given, splits the other language's side
    instead (`word_stems`: word prefixes, for languages that inflect).
    """
    rows = []
    x_units = x_units or units
    for lang, part in names[names["lang"].isin(set(langs))].groupby("lang"):
        en_sets = [units(s) for s in part["en"]]
        x_sets = [x_units(s) for s in part["text"]]
        c_en = Counter(w for s in en_sets for w in s)
        c_x = Counter(w for s in x_sets for w in s)
        both = Counter((x, e) for xs, es in zip(x_sets, en_sets) for x in xs for e in es)
        best: dict[str, list[tuple[float, str]]] = {}
        for (x, e), n in both.items():
            if n >= min_count:
                best.setdefault(x, []).append((2 * n / (c_x[x] + c_en[e]), e))
        for x, scored in best.items():
            scored.sort(reverse=True)
            top, e = scored[0]
            if top >= min_dice and (len(scored) == 1 or scored[1][0] < top):
                rows.append((e, x, lang, kind, ""))
    rows.sort(key=lambda r: (r[2], r[1]))  # the sets above iterate in hash order, which differs per process
    return pd.DataFrame(rows, columns=list(COLUMNS))


def parallel_table(langs: Sequence[str] = ("ko",), exclude: Iterable[str] = (), words: bool = True,
                   keywords: Optional[dict[str, dict[str, str]]] = None) -> pd.DataFrame:
    """Names, keyword lists (with `keywords`) and the words (kind "word") and word stems ("stem") aligned in them,
    as one table with columns en, text, lang, kind, emoji."""
    exclude = set(exclude)
    parts = [emoji_names(langs, exclude)]
    if keywords:
        parts.append(keyword_pairs(keywords, langs, exclude))
    if words:
        words_found = align_words(parts[0])
        stems = align_words(parts[0], x_units=word_stems, kind="stem")
        parts += [words_found, stems[~stems["text"].isin(set(words_found["text"]))]]  # a prefix that is a word stays one
        if keywords:  # keywords already are words: every language aligns, not only the spaced ones
            parts.append(align_words(parts[1], units=_keywords, langs=langs))
    return pd.concat(parts).drop_duplicates(["en", "text", "lang", "kind"], ignore_index=True)  # a word found twice


def build_parallel(path: Union[str, os.PathLike], langs: Sequence[str] = ("ko",), exclude: Iterable[str] = (),
                   words: bool = True, keywords: Optional[dict[str, dict[str, str]]] = None) -> ParallelSummary:
    """Write `parallel_table(...)` as a TSV (what `clipkit distill-text --parallel` reads), atomically."""
    exclude = set(exclude)
    table = parallel_table(langs, exclude, words, keywords)
    with atomic_path(path) as tmp:
        table.to_csv(tmp, sep="\t", index=False)
    counts = table.groupby(["lang", "kind"]).size()
    return ParallelSummary(str(path), {f"{lang}/{kind}": int(n) for (lang, kind), n in counts.items()},
                           excluded_names=len(exclude))
