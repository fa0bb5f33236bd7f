"""Combined queries: text and image together (a weighted sum of normalised embeddings, renormalised), minus
negative text, as one query vector.

A negative term lowers what resembles it, as `clipkit rerank --negative-prompt` does: the score of an image is
`cos(image, positive) - negative_weight * cos(image, negative)` up to one positive factor, so the ranking is the
same. Several negative terms are averaged into one negative direction. In query text, a word starting with
`-` is a negative term (`cat -dog`, `-"red car"` for a phrase); a lone `-` or one inside a word
(`t-shirt`) is text.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import numpy as np

from .exact import check_vectors

NEGATIVE_WEIGHT = 1.0  # as `rerank --negative-prompt`
IMAGE_WEIGHT = 0.5  # text and image count alike
_NEGATIVE = re.compile(r'(?:(?<=\s)|^)-(?:"([^"]+)"|(\S+))')


@dataclass(frozen=True)
class Query:
    """One search query: `text` and/or `image` (a path, bytes or a PIL image), negative terms, weights."""

    text: Optional[str] = None
    image: Any = None
    negative: tuple[str, ...] = ()
    image_weight: float = IMAGE_WEIGHT
    negative_weight: float = NEGATIVE_WEIGHT

    def check(self) -> None:
        if not self.text and self.image is None:
            raise ValueError("a query needs text or an image (negative terms alone rank nothing)")
        for name, w in (("image_weight", self.image_weight), ("negative_weight", self.negative_weight)):
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0.0 <= w <= (1.0 if name[0] == "i" else 10.0):
                raise ValueError(f"{name} must be a number in [0, {1 if name[0] == 'i' else 10}], got {w!r}")
        if any(not isinstance(t, str) or not t.strip() for t in self.negative):
            raise ValueError("negative terms must be non-empty strings")


def split_negatives(text: str) -> tuple[str, tuple[str, ...]]:
    """`"a cat -dog -\\"red car\\""` -> `("a cat", ("dog", "red car"))`."""
    negatives = tuple(m.group(1) or m.group(2) for m in _NEGATIVE.finditer(text))
    positive = " ".join(_NEGATIVE.sub(" ", text).split())
    return positive, negatives


def parse_query(text: Optional[str] = None, image: Any = None, negative: Union[str, Sequence[str], None] = None,
                image_weight: float = IMAGE_WEIGHT, negative_weight: float = NEGATIVE_WEIGHT) -> Query:
    """A checked `Query` from user input: `-word` terms of `text` and `negative` (one string or several) are
    the negative terms."""
    positive, found = split_negatives(text) if text else (None, ())
    extra = (negative,) if isinstance(negative, str) else tuple(negative or ())
    query = Query(positive or None, image, found + tuple(t.strip() for t in extra), image_weight, negative_weight)
    query.check()
    return query


def _unit(x: np.ndarray) -> np.ndarray:
    return check_vectors(np.asarray(x, np.float32).reshape(1, -1), "query embedding")[0]


def query_vector(embedder: Any, query: Query) -> np.ndarray:
    """The `[1, D]` L2-normalised vector of `query` (embedder: an `Embedder`); a query whose parts cancel
    (`cat -cat`) has no direction and raises ValueError."""
    query.check()
    parts = []
    if query.text:
        parts.append((1.0 - query.image_weight if query.image is not None else 1.0, embedder.texts([query.text])[0]))
    if query.image is not None:
        image = os.fspath(query.image) if isinstance(query.image, os.PathLike) else query.image
        parts.append((query.image_weight if query.text else 1.0, embedder.images([image])[0]))
    q = sum(w * _unit(v) for w, v in parts)
    if query.negative and query.negative_weight:
        negative = embedder.texts(list(query.negative))
        q = _unit(q) - query.negative_weight * _unit(np.mean([_unit(v) for v in negative], axis=0))
    return _unit(q)[None, :]
