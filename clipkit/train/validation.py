"""Evaluation inside a run: validation metrics that leave the training RNG stream untouched, and the WiSE-FT
sweep between the starting and the fine-tuned weights (a table and a plot of the trade-off)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd
import torch

from ..embed import Embedder
from ..evaluate.runners import eval_retrieval, eval_zeroshot
from ..evaluate.zeroshot import DEFAULT_TEMPLATES
from ..fileio import write_text_atomic
from ..formats.native import save as save_model_dir
from ..model.clip import CLIPModel
from ..model.tokenizer import Tokenizer
from ..model.transforms import Preprocess
from ..report.plots import plot_tradeoff
from .runstate import rng_state, set_rng_state
from .setup import locked_text_features

StateDict = dict[str, torch.Tensor]


class LockedTextEmbedder(Embedder):
    """An Embedder for a model whose text tower is locked: each string's pooled features are computed once and kept
    in `pooled` (shared between validations), so only the trained projection runs again."""

    def __init__(self, *args: Any, pooled: dict[str, torch.Tensor], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pooled = pooled

    @torch.inference_mode()
    def texts(self, strings: Sequence[str]) -> np.ndarray:
        missing = [s for s in dict.fromkeys(strings) if s not in self.pooled]
        if missing:
            feats = locked_text_features(self.model, self.tokenizer, missing, False, self.precision.text)
            self.pooled.update(zip(missing, feats))
        if not strings:
            return np.zeros((0, self.dim), np.float32)
        pooled = torch.stack([self.pooled[s] for s in strings]).to(self.device)
        return self.model.encode_text_pooled(pooled).cpu().numpy()


def evaluate_model(model: CLIPModel, tokenizer: Tokenizer, device: torch.device, table: pd.DataFrame,
                   templates: Optional[Sequence[str]] = None,
                   text_cache: Optional[dict[str, torch.Tensor]] = None) -> dict[str, Any]:
    """Retrieval metrics on `table` and, when it has a `label` column, zero-shot ones under `templates` (None:
    DEFAULT_TEMPLATES). With `text_cache` (a locked text tower) texts' pooled features are kept there and reused.
    The RNG states are restored and the model is back in train mode afterwards."""
    rng = rng_state()
    kind, extra = (Embedder, {}) if text_cache is None else (LockedTextEmbedder, {"pooled": text_cache})
    emb = kind(model, preprocess=Preprocess(model.config.preprocess), tokenizer=tokenizer, device=device,
               progress=False, **extra)
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


def score_name(metrics: dict[str, Any]) -> str:
    """What `validation_score` measures for these metrics."""
    return "zero-shot top-1" if "top1" in metrics else "mean R@1"


def wise_ft_sweep(model: CLIPModel, tokenizer: Tokenizer, device: torch.device, initial: StateDict,
                  alphas: Sequence[float], out: Path, val: Optional[pd.DataFrame], reference: Optional[pd.DataFrame],
                  templates: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Evaluate `mix_weights(initial, fine-tuned, a)` for a = 0 (the starting model), each of `alphas` and 1 (the
    fine-tuned model) on `val` (the new domain) and `reference` (the starting model's domain). Each listed mix
    strictly between 0 and 1 is saved as `out/wise_ft/alpha_A`; `out/wise_ft.md` holds the table and
    `out/wise_ft.png` the trade-off. `model` holds the fine-tuned weights again afterwards."""
    tuned = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rows = []
    for a in sorted({0.0, 1.0, *alphas}):
        model.load_state_dict(mix_weights(initial, tuned, a))
        row: dict[str, Any] = {"alpha": a, "model": "initial" if a == 0 else "finetuned" if a == 1 else None}
        for key, table in (("val", val), ("reference", reference)):
            if table is not None:
                row[key] = evaluate_model(model, tokenizer, device, table, templates)
        if row["model"] is None:
            row["model"] = str(save_model_dir(model, tokenizer, out / "wise_ft" / f"alpha_{a:g}"))
        rows.append(row)
    model.load_state_dict(tuned)
    table = wise_ft_table(rows)
    write_text_atomic(out / "wise_ft.md", table + "\n")
    _plot_wise_ft(rows, out / "wise_ft.png")
    return {"alphas": list(alphas), "rows": rows, "table": str(out / "wise_ft.md"), "plot": str(out / "wise_ft.png")}


def wise_ft_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table: one row per mixing weight, the score on each evaluated table, and where the model is."""
    keys = [k for k in ("reference", "val") if k in rows[0]]
    names = {"reference": "reference (starting domain)", "val": "validation (new domain)"}
    head = ["alpha"] + [f"{names[k]} {score_name(rows[0][k])}" for k in keys] + ["model"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{r['alpha']:g}"] + [f"{validation_score(r[k]):.4f}" for k in keys] + [r["model"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plot_wise_ft(rows: list[dict[str, Any]], png: Path) -> None:
    labels = [f"alpha={r['alpha']:g}" for r in rows]
    if "reference" in rows[0] and "val" in rows[0]:
        x, xlabel = [validation_score(r["reference"]) for r in rows], f"reference: {score_name(rows[0]['reference'])}"
    else:
        x, xlabel = [r["alpha"] for r in rows], "alpha (0: starting model, 1: fine-tuned)"
    key = "val" if "val" in rows[0] else "reference"
    y = [validation_score(r[key]) for r in rows]
    ylabel = f"{'validation' if key == 'val' else 'reference'}: {score_name(rows[0][key])}"
    plot_tradeoff(x, y, labels, png, xlabel=xlabel, ylabel=ylabel, title="WiSE-FT: (1 - alpha) start + alpha tuned")
