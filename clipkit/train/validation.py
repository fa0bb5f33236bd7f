"""Evaluation inside a run: validation metrics that leave the training RNG stream untouched, and WiSE-FT mixing."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import pandas as pd
import torch

from ..embed import Embedder
from ..evaluate.runners import eval_retrieval, eval_zeroshot
from ..evaluate.zeroshot import DEFAULT_TEMPLATES
from ..model.clip import CLIPModel
from ..model.tokenizer import Tokenizer
from ..model.transforms import Preprocess
from .runstate import rng_state, set_rng_state

StateDict = dict[str, torch.Tensor]


def evaluate_model(model: CLIPModel, tokenizer: Tokenizer, device: torch.device, table: pd.DataFrame,
                   templates: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Retrieval metrics on `table` and, when it has a `label` column, zero-shot ones under `templates` (None:
    DEFAULT_TEMPLATES). The RNG states are restored and the model is back in train mode afterwards."""
    rng = rng_state()
    emb = Embedder(model, preprocess=Preprocess(model.config.preprocess), tokenizer=tokenizer, device=device,
                   progress=False)
    metrics = dict(eval_retrieval(emb, table).metrics)
    if "label" in table.columns:
        metrics.update(eval_zeroshot(emb, table, templates=templates or DEFAULT_TEMPLATES).metrics)
    set_rng_state(rng)
    model.train()
    return metrics


def validation_score(metrics: dict[str, Any]) -> float:
    """What "best" means: zero-shot top-1 when there are labels, else the mean of both retrieval R@1."""
    return metrics.get("top1", (metrics.get("text_to_image_R@1", 0) + metrics.get("image_to_text_R@1", 0)) / 2)


def mix_weights(initial: StateDict, tuned: StateDict, alpha: float) -> StateDict:
    """WiSE-FT: `(1 - alpha) * initial + alpha * tuned` for float tensors; others (counters) stay as tuned."""
    return {k: (1 - alpha) * initial[k] + alpha * v if v.is_floating_point() else v for k, v in tuned.items()}
