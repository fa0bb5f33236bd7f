"""Built-in demo datasets that need no download at run time."""
from __future__ import annotations

from .emoji import EmojiSummary, build_emoji_dataset

__all__ = ["EmojiSummary", "build_emoji_dataset"]
