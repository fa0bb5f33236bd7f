"""Zero-shot classifiers from class names: prompt templates and the one prompt-ensemble builder.

The default templates are dataset-neutral; a dataset with its own wording (the emoji demo) passes its own.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence, Union

import numpy as np

from ..errors import DataError

DEFAULT_TEMPLATES = ("a photo of a {}.", "{}")


def check_templates(templates: Sequence[str]) -> tuple[str, ...]:
    """The templates as a tuple; each must hold exactly one `{}` for the class name (other braces are text)."""
    templates = tuple(templates)
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
        raise ValueError("need at least one template, each with exactly one '{}' for the class name"
                         + (f"; got {bad[0]!r}" if bad else ""))
    return templates


def load_templates(path: Union[str, os.PathLike]) -> tuple[str, ...]:
    """Prompt templates from a text file, one per line with `{}` for the class name; blank and # lines skipped."""
    lines = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines()]
    try:
        return check_templates(ln for ln in lines if ln and not ln.startswith("#"))
    except ValueError as e:
        raise DataError(f"{path}: {e}") from None


def zero_shot_weights(
    text_embed_fn: Callable[[list[str]], np.ndarray], classnames: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES
) -> np.ndarray:
    """Classifier `[C, D]`: per class the normalised mean of its normalised template embeddings (a prompt ensemble).

    Also the query of a prompt under several templates (scoring, reranking): a "class" is then a prompt.
    """
    templates = check_templates(templates)
    if not classnames:
        raise ValueError("need at least one class name")
    texts = [t.replace("{}", str(c)) for c in classnames for t in templates]
    emb = np.asarray(text_embed_fn(texts), np.float32).reshape(len(classnames), len(templates), -1)  # [C*T, D] -> [C, T, D]
    return _l2_normalise(_l2_normalise(emb).mean(1))  # [C, D]


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
