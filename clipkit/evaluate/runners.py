"""Evaluation runners: embed a table with an `Embedder`, return an `EvalResult` with flat JSON-safe metrics.

Each metric sits beside its chance level (`chance_<metric>`); unloadable images are skipped and counted.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import pandas as pd

from ..embed import Embedder, as_embedder
from ..errors import DataError
from ..fileio import json_safe, write_json_atomic
from ..report.plots import contact_sheet, plot_few_shot, plot_retrieval_grid
from .fewshot import DEFAULT_SEEDS, DEFAULT_SHOTS, accuracy, few_shot_curve, finite_scores, fit_linear_probe, summarise_few_shot
from .metrics import classification_metrics, per_class_table, retrieval_metrics
from .scoring import clip_score, r_precision, ranking_json, ref_clip_score, rerank, rerank_table, summarise_scores
from .zeroshot import DEFAULT_TEMPLATES, load_templates, zero_shot_weights


@dataclass
class EvalResult:
    """A runner's output: flat JSON-safe `metrics` (with `chance_*` beside each), extra tables, plot examples."""

    task: str
    metrics: dict[str, Any]
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    examples: Optional[dict[str, list]] = None  # retrieval: {"queries": [...], "results": [[(path, score)]]}

    def table(self, max_rows: int = 30) -> str:
        """Markdown: metric | value | chance, then each extra table (first `max_rows` rows; per-seed runs only in JSON)."""
        hidden = ("chance_", "majority_") + (("few_shot_",) if "few_shot" in self.tables else ())  # shown below
        rows = [[k, _fmt(v), _chance_cell(self.metrics, k)] for k, v in self.metrics.items() if not k.startswith(hidden)]
        parts = [f"### {self.task}\n", _markdown(["metric", "value", "chance"], rows)]
        for name, df in self.tables.items():
            if name.endswith("_runs"):
                continue
            more = f"\n({len(df) - max_rows} more rows)" if len(df) > max_rows else ""
            parts.append(f"\n#### {name}\n\n" + _markdown(list(df.columns), df.head(max_rows).values.tolist()) + more)
        return "\n".join(parts)


def _chance_cell(metrics: dict[str, Any], key: str) -> str:
    cell = _fmt(metrics.get(f"chance_{key}"))
    if f"majority_{key}" in metrics:
        cell += f" (majority class {_fmt(metrics[f'majority_{key}'])})"
    return cell


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, (float, np.floating)):
        return f"{v:.4f}" if math.isfinite(v) else str(v)
    return str(v)


def _markdown(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(map(str, headers)) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _require(table: pd.DataFrame, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise DataError(f"table lacks column(s) {missing}; it has {list(table.columns)}")


def dedupe_images(table: pd.DataFrame, image_column: str = "image") -> tuple[list[str], np.ndarray]:
    """Unique image paths in first-seen order and each row's index into them, so repeats embed once."""
    _require(table, [image_column])
    if table[image_column].isna().any():
        raise DataError(f"column {image_column!r} has {int(table[image_column].isna().sum())} empty rows")
    codes, uniques = pd.factorize(table[image_column].astype(str), sort=False)
    return [str(u) for u in uniques], codes.astype(np.int64)


def _embed_unique(embedder: Embedder, paths: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """`([N, D] embeddings, [N] loaded mask)`; only images that failed to load are masked, not NaN outputs."""
    emb = embedder.images(paths, on_error="nan")
    ok = np.ones(len(paths), bool)
    ok[[i for i, _ in getattr(embedder, "failures", [])]] = False
    return emb, ok


def _labels(table: pd.DataFrame, label_column: str) -> pd.Series:
    """The label column as stripped text; a missing or empty label (an image outside every class folder) is NA."""
    _require(table, [label_column])
    text = table[label_column].map(lambda v: str(v).strip() if pd.notna(v) else "")
    return text.mask(text == "")


def _labelled(
    embedder: Embedder, table: pd.DataFrame, label_column: str, classnames: list[str]
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Embeddings `[N, D]` and class ids `[N]` of the loadable (image, label) pairs, plus skip counts."""
    _require(table, ["image"])
    labelled = pd.DataFrame({"image": table["image"], label_column: _labels(table, label_column)}).dropna()
    samples = labelled.drop_duplicates()
    paths, img_idx = dedupe_images(samples)
    emb, ok = _embed_unique(embedder, paths)
    keep = ok[img_idx]
    y = pd.Categorical(samples[label_column], categories=classnames).codes[keep].astype(np.int64)
    counts = {"skipped_images": int((~ok).sum()), "unlabelled_rows": int(len(table) - len(labelled))}
    if not keep.any():
        raise DataError(f"none of the {len(paths)} labelled images could be loaded")
    return emb[img_idx[keep]], y, counts


def _class_names(label_column: str, *tables: pd.DataFrame) -> list[str]:
    names = sorted({v for t in tables for v in _labels(t, label_column).dropna()})
    if not names:
        raise DataError(f"column {label_column!r} holds no labels")
    return names


def eval_zeroshot(
    embedder: Embedder, table: pd.DataFrame, label_column: str = "label", templates: Sequence[str] = DEFAULT_TEMPLATES
) -> EvalResult:
    """Zero-shot top-1/top-5/balanced accuracy; classes are the table's sorted unique labels."""
    classnames = _class_names(label_column, table)
    X, y, counts = _labelled(embedder, table, label_column, classnames)
    scores = X @ zero_shot_weights(embedder.texts, classnames, templates).T  # [N, D] @ [D, C] -> [N, C]
    metrics = {**classification_metrics(scores, y), **counts, "num_templates": len(templates)}
    return EvalResult("zeroshot", _json_safe(metrics), {"per_class": per_class_table(scores, y, classnames)})


def eval_retrieval(embedder: Embedder, table: pd.DataFrame, num_examples: int = 8, top_k: int = 5) -> EvalResult:
    """Text<->image recall over the table's rows (unloadable images skipped).

    Repeated images are embedded once, and identical captions are one text query that is right for
    every image carrying it (two art styles of one emoji share a caption: neither is a wrong answer).
    """
    _require(table, ["image", "caption"])
    paths, t2i = dedupe_images(table)
    emb, ok = _embed_unique(embedder, paths)
    new_row = np.cumsum(ok) - 1  # old image row -> row among loaded images
    keep = ok[t2i] & table["caption"].notna().to_numpy()
    if not ok.any() or not keep.any():
        raise DataError("no loadable image with a caption to evaluate")
    kept = pd.DataFrame({"caption": table["caption"].to_numpy()[keep].astype(str), "image": new_row[t2i[keep]]})
    groups = kept.groupby("caption", sort=False)["image"].agg(lambda s: np.unique(s.to_numpy()))
    captions = groups.index.tolist()
    image_emb, text_emb = emb[ok], embedder.texts(captions)
    metrics = retrieval_metrics(image_emb, text_emb, list(groups.to_numpy()))
    metrics.update(skipped_images=int((~ok).sum()), skipped_texts=int(len(table) - keep.sum()),
                   duplicate_captions=int(len(kept) - len(captions)))
    examples = retrieval_examples(image_emb, text_emb[:num_examples], [p for p, o in zip(paths, ok) if o], top_k)
    examples_dict = {"queries": captions[:num_examples], "results": examples}
    return EvalResult("retrieval", _json_safe(metrics), examples=examples_dict)


def retrieval_examples(
    image_emb: np.ndarray, query_emb: np.ndarray, paths: Sequence[str], k: int = 5
) -> list[list[tuple[str, float]]]:
    """Top-k `(path, score)` per query, best first (what `plots.plot_retrieval_grid` draws)."""
    s = finite_scores(query_emb @ image_emb.T)  # [Q, Ni]
    top = np.argsort(-s, axis=1, kind="stable")[:, :k]  # [Q, k]
    return [[(paths[j], float(s[q, j])) for j in row] for q, row in enumerate(top)]


def eval_linear_probe(
    embedder: Embedder,
    train_table: pd.DataFrame,
    test_table: pd.DataFrame,
    label_column: str = "label",
    shots: Sequence[int] = DEFAULT_SHOTS,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    seeds: Sequence[int] = DEFAULT_SEEDS,
) -> EvalResult:
    """Linear probe on all training embeddings, zero-shot for reference, and the few-shot curve (empty `shots` skips it)."""
    classnames = _class_names(label_column, train_table, test_table)
    train_X, train_y, c_train = _labelled(embedder, train_table, label_column, classnames)
    test_X, test_y, c_test = _labelled(embedder, test_table, label_column, classnames)
    probe = fit_linear_probe(train_X, train_y, len(classnames), device=getattr(embedder, "device", "cpu"))
    scores = probe.predict_scores(test_X)  # [Nt, C]
    zs = zero_shot_weights(embedder.texts, classnames, templates)
    metrics = {**classification_metrics(scores, test_y), "probe_l2": probe.l2, "num_train": len(train_y)}
    metrics.update(zero_shot_top1=accuracy(test_X @ zs.T, test_y), chance_zero_shot_top1=1.0 / len(classnames))
    metrics.update(skipped_images=c_train["skipped_images"] + c_test["skipped_images"],
                   unlabelled_rows=c_train["unlabelled_rows"] + c_test["unlabelled_rows"])
    tables = {"per_class": per_class_table(scores, test_y, classnames)}
    if shots:
        curve = few_shot_curve(train_X, train_y, test_X, test_y, zs, shots=shots, seeds=seeds)
        summary = summarise_few_shot(curve).assign(chance=1.0 / len(classnames))
        for r in summary.itertuples():
            metrics[f"few_shot_{r.method}_k{r.k}_top1"] = r.mean
            metrics[f"chance_few_shot_{r.method}_k{r.k}_top1"] = r.chance
        tables.update(few_shot=summary, few_shot_runs=curve)
    return EvalResult("linear_probe", _json_safe(metrics), tables)


def _json_safe(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: json_safe(v) for k, v in metrics.items()}


def write_json(result: EvalResult, path: Union[str, os.PathLike]) -> None:
    """Write task, metrics and tables (as lists of records) to `path` atomically."""
    tables = {
        name: [{k: json_safe(v) for k, v in rec.items()} for rec in df.to_dict("records")]
        for name, df in result.tables.items()
    }
    write_json_atomic(path, {"task": result.task, "metrics": _json_safe(result.metrics), "tables": tables})


def read_labelled(spec: Union[str, os.PathLike]) -> pd.DataFrame:
    """A labelled table, or a class-folder dataset: every image (captioned or not) labelled by its sub-folder."""
    from ..data.tables import read_folder, read_pairs

    return read_folder(spec, keep_uncaptioned=True) if Path(spec).is_dir() else read_pairs(spec)


def run_eval(
    kind: str,
    model: Any,
    data: Union[str, os.PathLike],
    *,
    train: Optional[Union[str, os.PathLike]] = None,
    label_column: str = "label",
    templates: Optional[Union[str, os.PathLike]] = None,
    json_out: Optional[Union[str, os.PathLike]] = None,
    plot: Optional[Union[str, os.PathLike]] = None,
) -> EvalResult:
    """What `clipkit eval KIND` runs: read the tables, embed, evaluate, write JSON and the plot.

    Zero-shot and linear-probe read a folder as class folders (label = sub-folder, captions optional);
    retrieval needs captions. `plot` is a retrieval grid or, for linear-probe, the few-shot curve.
    """
    from ..data.tables import read_pairs

    if kind not in ("zeroshot", "retrieval", "linear-probe"):
        raise ValueError(f"unknown evaluation {kind!r}; choose zeroshot, retrieval or linear-probe")
    if kind == "linear-probe" and train is None:
        raise ValueError("linear-probe needs a train= table (the labelled images the probe learns from)")
    if kind == "zeroshot" and plot:
        raise ValueError("zero-shot evaluation draws no plot; plots exist for retrieval and linear-probe")
    embedder = as_embedder(model)
    tmpl = load_templates(templates) if templates else DEFAULT_TEMPLATES
    if kind == "retrieval":
        result = eval_retrieval(embedder, read_pairs(data))
    elif kind == "zeroshot":
        result = eval_zeroshot(embedder, read_labelled(data), label_column=label_column, templates=tmpl)
    else:
        result = eval_linear_probe(embedder, read_labelled(train), read_labelled(data), label_column=label_column,
                                   templates=tmpl)
    if json_out:
        write_json(result, json_out)
    if plot and result.examples:
        plot_retrieval_grid(result.examples["queries"], result.examples["results"], plot)
    elif plot and "few_shot" in result.tables:
        plot_few_shot(result.tables["few_shot"], plot)
    return result


def _references(cell: Any) -> list[str]:
    """A references cell: a JSON list of captions, or captions separated by `|`."""
    text = str(cell).strip()
    refs = json.loads(text) if text.startswith("[") else text.split("|")
    return [str(r).strip() for r in refs if str(r).strip()]


def score_table(model: Any, pairs: str | os.PathLike, *, prompt_column: str = "prompt", image_column: str = "image",
                prefix: Optional[str] = None, r_precision_r: Optional[int] = None,
                reference_column: Optional[str] = None, resize_mode: Optional[str] = None,
                json_out: Optional[str | os.PathLike] = None) -> dict[str, Any]:
    """CLIPScore (RefCLIPScore with references, R-precision on request) of a (prompt, image) table."""
    from ..data.tables import read_table

    table = read_table(pairs, image_column=image_column, caption_column=prompt_column)
    embedder = as_embedder(model, resize_mode=resize_mode)
    prompts, images = table["caption"].tolist(), table["image"].tolist()
    scores = clip_score(embedder, prompts, images, prefix=prefix)
    summary = {**summarise_scores(scores), "prefix": prefix, "w": 2.5}
    ref = None
    if reference_column:
        _require(table, [reference_column])
        refs = [_references(c) for c in table[reference_column]]
        ref = ref_clip_score(embedder, prompts, images, refs, prefix=prefix)
        summary["refclipscore_mean"] = json_safe(float(np.nanmean(ref))) if np.isfinite(ref).any() else None
    if r_precision_r:
        rp = r_precision(embedder, prompts, images, R=r_precision_r)
        summary.update(r_precision=rp["r_precision"], chance_r_precision=rp["chance_r_precision"],
                       r_precision_R=rp["R"], r_precision_n=rp["n"], r_precision_n_failed=rp["n_failed"])
    if json_out:
        rows = [{"prompt": p, "image": r, "clipscore": json_safe(s)}
                for p, r, s in zip(prompts, table["image_rel"], scores)]
        for row, v in zip(rows, ref if ref is not None else []):
            row["refclipscore"] = json_safe(v)
        write_json_atomic(json_out, {**summary, "pairs": rows})
    return summary


def rerank_files(model: Any, prompt: str, images: Sequence[str], *, top: Optional[int] = None,
                 templates: Optional[list[str]] = None, negative_prompt: Optional[str] = None,
                 resize_mode: Optional[str] = None, sheet: Optional[str | os.PathLike] = None,
                 json_out: Optional[str | os.PathLike] = None) -> dict[str, Any]:
    """Rank candidate files for a prompt; optionally write the ranking JSON and a contact sheet."""
    embedder = as_embedder(model, resize_mode=resize_mode)
    kept = rerank(embedder, prompt, list(images), templates=templates, negative_prompt=negative_prompt, top=top)
    if sheet:
        contact_sheet(kept, sheet, prompt=prompt)
    result = ranking_json(prompt, kept)
    if json_out:
        write_json_atomic(json_out, result)
    return result


def rerank_pairs(model: Any, pairs: str | os.PathLike, *, prompt_column: str = "prompt", image_column: str = "image",
                 top: Optional[int] = None, templates: Optional[list[str]] = None,
                 negative_prompt: Optional[str] = None, resize_mode: Optional[str] = None,
                 sheet_dir: Optional[str | os.PathLike] = None,
                 json_out: Optional[str | os.PathLike] = None) -> list[dict[str, Any]]:
    """Batch best-of-N: a (prompt, image) table grouped by prompt; one ranking (and sheet) per prompt."""
    from ..data.tables import read_table

    table = read_table(pairs, image_column=image_column, caption_column=prompt_column).rename(columns={"caption": "prompt"})
    ranked = rerank_table(as_embedder(model, resize_mode=resize_mode), table, templates=templates,
                          negative_prompt=negative_prompt, top=top)
    results = []
    for i, (prompt, kept) in enumerate(ranked.items()):
        if sheet_dir:
            contact_sheet(kept, Path(sheet_dir) / f"prompt{i:04d}.png", prompt=prompt)
        results.append(ranking_json(prompt, kept))
    if json_out:
        write_json_atomic(json_out, results)
    return results
