"""Honest model evaluation: retrieval recall, zero-shot and few-shot classification, each beside its chance level.

Metric functions take and return arrays. Runners (`eval_*`) embed a table with an `Embedder` and return
an `EvalResult` whose `.metrics` are flat and JSON-safe. Ties always count against the model (a tied
wrong item ranks above the right one) and NaN scores count as -inf, so a constant or broken model
scores at or below chance, never above.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, Union

import numpy as np
import pandas as pd
from scipy import sparse

from .errors import DataError
from .fewshot import (
    DEFAULT_SEEDS,
    DEFAULT_SHOTS,
    accuracy,
    few_shot_curve,
    finite_scores,
    fit_linear_probe,
    summarise_few_shot,
    target_ranks,
)
from .fileio import json_safe, write_json_atomic

if TYPE_CHECKING:  # runners only call .images(paths, on_error="nan"), .failures and .texts(strings)
    from .embed import Embedder

DEFAULT_TEMPLATES = ("a photo of a {}.", "an emoji of {}.", "an icon of {}.", "a drawing of a {}.", "{}")
RETRIEVAL_KS = (1, 5, 10)
CHUNK = 1024  # query rows per similarity block: bounds memory at CHUNK x gallery floats

# ----------------------------------------------------------------------------- retrieval


def _relevance(text_to_image: Any, num_images: int) -> sparse.csr_matrix:
    """`[Nt, Ni]` boolean relevance from one image index per text, or a sequence of index arrays per text."""
    if isinstance(text_to_image, np.ndarray) and text_to_image.ndim == 1 and text_to_image.dtype != object:
        rows, cols = np.arange(len(text_to_image)), np.asarray(text_to_image, np.int64)
    else:
        sets = [np.atleast_1d(np.asarray(x, np.int64)) for x in text_to_image]
        rows, cols = np.repeat(np.arange(len(sets)), [len(x) for x in sets]), np.concatenate(sets or [np.zeros(0, np.int64)])
    if len(rows) and (cols.min() < 0 or cols.max() >= num_images):
        raise ValueError("text_to_image holds an index outside the image rows")
    rel = sparse.csr_matrix((np.ones(len(rows), bool), (rows, cols)), shape=(int(rows.max(initial=-1)) + 1, num_images))
    if rel.shape[0] and (np.diff(rel.indptr) == 0).any():
        raise ValueError("every text needs at least one relevant image")
    return rel


def _best_ranks(queries: np.ndarray, gallery: np.ndarray, rel: sparse.csr_matrix) -> np.ndarray:
    """Per query row: 1 + number of non-relevant gallery items scoring >= its best relevant one (ties pessimistic)."""
    ranks = []
    for i in range(0, len(queries), CHUNK):
        s = finite_scores(queries[i : i + CHUNK] @ gallery.T)  # [B, N]
        mine = rel[i : i + CHUNK].toarray()  # [B, N]
        best = np.where(mine, s, -np.inf).max(1, keepdims=True)  # [B, 1]
        ranks.append(1 + ((s >= best) & ~mine).sum(1))
    return np.concatenate(ranks) if ranks else np.zeros(0, np.int64)


def retrieval_metrics(
    image_emb: np.ndarray, text_emb: np.ndarray, text_to_image: Any, ks: Sequence[int] = RETRIEVAL_KS
) -> dict[str, float]:
    """Text->image and image->text Recall@k and median rank (1-based), plus `chance_*` for each.

    `text_to_image[t]` is the image row of caption t, or an array of rows when a caption fits several
    images (identical captions of different images). A text query is right at k if one of its images
    is in its top k; an image query if ANY of its captions is (rank = best among them). Images without
    captions are gallery-only (no i2t query). Ties are pessimistic (see module docstring).
    """
    image_emb, text_emb = np.asarray(image_emb, np.float32), np.asarray(text_emb, np.float32)
    if len(text_to_image) != len(text_emb) or len(text_emb) == 0 or len(image_emb) == 0:
        raise ValueError(f"need >= 1 image and text and one entry per text; got {len(image_emb)} images, "
                         f"{len(text_emb)} texts, {len(text_to_image)} entries")
    rel = _relevance(text_to_image, len(image_emb))  # [Nt, Ni]
    captioned = np.flatnonzero(np.diff(rel.tocsc().indptr) > 0)
    t2i_ranks = _best_ranks(text_emb, image_emb, rel)
    i2t_ranks = _best_ranks(image_emb[captioned], text_emb, rel.T.tocsr()[captioned])
    out: dict[str, float] = {"num_images": len(image_emb), "num_texts": len(text_emb)}
    for name, ranks in (("text_to_image", t2i_ranks), ("image_to_text", i2t_ranks)):
        for k in ks:
            out[f"{name}_R@{k}"] = float(np.mean(ranks <= k))
        out[f"{name}_median_rank"] = float(np.median(ranks))
    out.update({f"chance_{k}": v for k, v in retrieval_chance(len(image_emb), text_to_image, ks).items()})
    return out


def retrieval_chance(num_images: int, text_to_image: Any, ks: Sequence[int] = RETRIEVAL_KS) -> dict[str, float]:
    """What a uniformly random ranking scores, under the same keys as `retrieval_metrics`.

    R@k for a query with m relevant items among n = 1 - C(n - m, k) / C(n, k) (m = 1 for a plain
    caption: k / Ni), averaged over queries. Median ranks: the median of the expected rank (n + 1) / (m + 1).
    """
    rel = _relevance(text_to_image, num_images)
    nt = rel.shape[0]
    m_t = np.diff(rel.indptr)  # relevant images per text
    m_i = np.diff(rel.tocsc().indptr)
    m_i = m_i[m_i > 0]  # captions per captioned image
    out: dict[str, float] = {}
    for name, n, m in (("text_to_image", num_images, m_t), ("image_to_text", nt, m_i)):
        counts = np.unique(m, return_counts=True)
        for k in ks:
            out[f"{name}_R@{k}"] = float(sum(c * _p_any_in_top_k(n, int(mi), k) for mi, c in zip(*counts)) / len(m))
        out[f"{name}_median_rank"] = float(np.median((n + 1) / (m + 1)))
    return out


def _p_any_in_top_k(n: int, m: int, k: int) -> float:
    if k > n - m:
        return 1.0
    return 1.0 - math.exp(sum(math.log((n - m - j) / (n - j)) for j in range(k)))


def dedupe_images(table: pd.DataFrame, image_column: str = "image") -> tuple[list[str], np.ndarray]:
    """Unique image paths in first-seen order and each row's index into them, so repeats embed once."""
    _require(table, [image_column])
    if table[image_column].isna().any():
        raise DataError(f"column {image_column!r} has {int(table[image_column].isna().sum())} empty rows")
    codes, uniques = pd.factorize(table[image_column].astype(str), sort=False)
    return [str(u) for u in uniques], codes.astype(np.int64)


# ----------------------------------------------------------------------------- zero-shot


def load_templates(path: Union[str, os.PathLike]) -> tuple[str, ...]:
    """Prompt templates from a text file, one per line with `{}` for the class name; blank and # lines skipped."""
    lines = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines()]
    templates = tuple(ln for ln in lines if ln and not ln.startswith("#"))
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise DataError(f"{path}: every template needs '{{}}' for the class name" + (f", e.g. {bad[0]!r}" if bad else ""))
    return templates


def zero_shot_weights(
    text_embed_fn: Callable[[list[str]], np.ndarray], classnames: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES
) -> np.ndarray:
    """Classifier `[C, D]`: per class the normalised mean of its normalised template embeddings (a prompt ensemble)."""
    if not classnames or not templates:
        raise ValueError("need at least one class name and one template")
    if any("{}" not in t for t in templates):
        raise ValueError("every template needs '{}' for the class name")
    texts = [t.replace("{}", str(c)) for c in classnames for t in templates]
    emb = np.asarray(text_embed_fn(texts), np.float32).reshape(len(classnames), len(templates), -1)  # [C*T, D] -> [C, T, D]
    return _l2_normalise(_l2_normalise(emb).mean(1))  # [C, D]


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


# ----------------------------------------------------------------------------- classification


def classification_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """top1, top5 and balanced accuracy (mean recall over classes present), with chance levels.

    `chance_*` is a uniformly random guess; `majority_top1` is always answering the most common class.
    """
    s, y = np.asarray(scores), np.asarray(labels, np.int64)
    if s.ndim != 2 or len(s) != len(y) or len(y) == 0:
        raise ValueError(f"need scores [N, C] and labels [N] with N >= 1; got {s.shape} and {y.shape}")
    n, c = s.shape
    if y.min() < 0 or y.max() >= c:
        raise ValueError(f"labels must lie in [0, {c})")
    ranks = target_ranks(s, y)  # [N]
    counts = np.bincount(y, minlength=c)
    present = counts > 0
    recall = np.bincount(y, weights=ranks == 1, minlength=c)[present] / counts[present]
    return {
        "top1": float(np.mean(ranks <= 1)),
        "top5": float(np.mean(ranks <= 5)),
        "balanced_accuracy": float(recall.mean()),
        "num_classes": c,
        "num_samples": n,
        "chance_top1": 1.0 / c,
        "chance_top5": min(5, c) / c,
        "chance_balanced_accuracy": 1.0 / c,
        "majority_top1": float(counts.max() / n),
    }


def per_class_table(scores: np.ndarray, labels: np.ndarray, classnames: Optional[Sequence[str]] = None) -> pd.DataFrame:
    """One row per class: n, recall (top-1 accuracy within the class), the class it is most often taken for."""
    s, y = finite_scores(scores), np.asarray(labels, np.int64)
    n_cls = s.shape[1]
    names = [str(x) for x in classnames] if classnames is not None else [str(i) for i in range(n_cls)]
    rival = np.where(np.eye(n_cls, dtype=bool)[y], -np.inf, s).argmax(1)  # best wrong class per sample [N]
    pred = np.where(target_ranks(s, y) == 1, y, rival)  # ties go to the wrong class, as in the metrics
    conf = np.zeros((n_cls, n_cls), np.int64)
    np.add.at(conf, (y, pred), 1)
    n = conf.sum(1)
    off = conf - np.diag(np.diag(conf))
    with np.errstate(invalid="ignore", divide="ignore"):
        recall, confused = np.diag(conf) / n, off.max(1) / n
    return pd.DataFrame({
        "class": names,
        "n": n,
        "recall": recall,
        "most_confused_with": [names[j] if off[i, j] else "" for i, j in enumerate(off.argmax(1))],
        "confused_rate": confused,
    })


# ----------------------------------------------------------------------------- runners


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


def _embed_unique(embedder: "Embedder", paths: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """`([N, D] embeddings, [N] loaded mask)`; only images that failed to load are masked, not NaN outputs."""
    emb = embedder.images(paths, on_error="nan")
    ok = np.ones(len(paths), bool)
    ok[[i for i, _ in getattr(embedder, "failures", [])]] = False
    return emb, ok


def _labelled(
    embedder: "Embedder", table: pd.DataFrame, label_column: str, classnames: list[str]
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Embeddings `[N, D]` and class ids `[N]` of the loadable (image, label) pairs, plus skip counts."""
    _require(table, ["image", label_column])
    labelled = table[["image", label_column]].dropna()
    samples = labelled.assign(**{label_column: labelled[label_column].astype(str)}).drop_duplicates()
    paths, img_idx = dedupe_images(samples)
    emb, ok = _embed_unique(embedder, paths)
    keep = ok[img_idx]
    y = pd.Categorical(samples[label_column], categories=classnames).codes[keep].astype(np.int64)
    counts = {"skipped_images": int((~ok).sum()), "unlabelled_rows": int(len(table) - len(labelled))}
    if not keep.any():
        raise DataError(f"none of the {len(paths)} labelled images could be loaded")
    return emb[img_idx[keep]], y, counts


def _class_names(label_column: str, *tables: pd.DataFrame) -> list[str]:
    for t in tables:
        _require(t, [label_column])
    names = sorted({str(v) for t in tables for v in t[label_column].dropna()})
    if not names:
        raise DataError(f"column {label_column!r} holds no labels")
    return names


def eval_zeroshot(
    embedder: "Embedder", table: pd.DataFrame, label_column: str = "label", templates: Sequence[str] = DEFAULT_TEMPLATES
) -> EvalResult:
    """Zero-shot top-1/top-5/balanced accuracy; classes are the table's sorted unique labels."""
    classnames = _class_names(label_column, table)
    X, y, counts = _labelled(embedder, table, label_column, classnames)
    scores = X @ zero_shot_weights(embedder.texts, classnames, templates).T  # [N, D] @ [D, C] -> [N, C]
    metrics = {**classification_metrics(scores, y), **counts, "num_templates": len(templates)}
    return EvalResult("zeroshot", _json_safe(metrics), {"per_class": per_class_table(scores, y, classnames)})


def eval_retrieval(embedder: "Embedder", table: pd.DataFrame, num_examples: int = 8, top_k: int = 5) -> EvalResult:
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
    embedder: "Embedder",
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


# ----------------------------------------------------------------------------- output


def _json_safe(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: json_safe(v) for k, v in metrics.items()}


def write_json(result: EvalResult, path: Union[str, os.PathLike]) -> None:
    """Write task, metrics and tables (as lists of records) to `path` atomically."""
    tables = {
        name: [{k: json_safe(v) for k, v in rec.items()} for rec in df.to_dict("records")]
        for name, df in result.tables.items()
    }
    write_json_atomic(path, {"task": result.task, "metrics": _json_safe(result.metrics), "tables": tables})


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
    """What `clipkit eval KIND` runs: read the tables, embed, evaluate, write JSON and the plot."""
    from .data import read_pairs
    from .embed import Embedder
    from .plots import plot_few_shot, plot_retrieval_grid

    embedder = model if hasattr(model, "texts") else Embedder(model)
    table = read_pairs(data)
    tmpl = load_templates(templates) if templates else DEFAULT_TEMPLATES
    if kind == "zeroshot":
        result = eval_zeroshot(embedder, table, label_column=label_column, templates=tmpl)
    elif kind == "retrieval":
        result = eval_retrieval(embedder, table)
    elif kind == "linear-probe":
        if train is None:
            raise ValueError("linear-probe needs --train TABLE (the labelled images the probe learns from)")
        result = eval_linear_probe(embedder, read_pairs(train), table, label_column=label_column, templates=tmpl)
    else:
        raise ValueError(f"unknown evaluation {kind!r}; choose zeroshot, retrieval or linear-probe")
    if json_out:
        write_json(result, json_out)
    if plot and result.examples:
        plot_retrieval_grid(result.examples["queries"], result.examples["results"], plot)
    elif plot and "few_shot" in result.tables:
        plot_few_shot(result.tables["few_shot"], plot)
    return result
