"""The README's main job: build the emoji data, train, evaluate on unseen emoji, index, search, rerank, report.

`run_demo(DemoConfig(out="demo"))` writes `demo/data`, `demo/model`, `demo/index`, `demo/metrics.json`
and `demo/report.html`. Every figure is measured on the test split, whose emoji were never trained on.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import pandas as pd

from ..fileio import atomic_dir, json_safe, write_json_atomic

if TYPE_CHECKING:
    from ..data.datasets import EmojiSummary
    from ..embed import Embedder
    from ..report.page import Section
    from ..search.index import SearchIndex

TEXT_QUERIES = ["a red apple", "a smiling cat", "a flag of a country", "a train", "a heart",
                "사과", "고양이", "기차"]  # the last three: apple, cat, train in Korean
RECIPES = {  # preset, extra trainer options
    "minilm": ("tiny-minilm", {"lock_text": True}),
    "scratch": ("tiny", {}),
}
HEADLINE = [("zero-shot top-1 (subcategory)", "zeroshot/top1"), ("zero-shot top-5", "zeroshot/top5"),
            ("text->image R@1", "retrieval/text_to_image_R@1"), ("text->image R@10", "retrieval/text_to_image_R@10"),
            ("image->text R@1", "retrieval/image_to_text_R@1"), ("image->text R@10", "retrieval/image_to_text_R@10"),
            ("best-of-N rerank top-1", "rerank/best_of_n_top1")]


@dataclass
class DemoConfig:
    """Knobs of the demo; the defaults are the README's run (about 10 minutes on 2 CPU cores)."""

    out: str = "demo"
    seed: int = 0
    recipe: str = "minilm"
    epochs: int = 12
    max_steps: Optional[int] = None
    batch_size: int = 64
    lr: float = 5e-4
    image_size: int = 64
    limit: Optional[int] = None  # emoji subset (tests)
    shots: tuple[int, ...] = (1, 2, 4, 8, 16)
    few_shot_seeds: tuple[int, ...] = (0, 1)
    rerank_candidates: int = 8
    rerank_prompts: int = 100
    queries: list[str] = field(default_factory=lambda: list(TEXT_QUERIES))
    progress: bool = True


@dataclass
class DemoState:
    """What the stages hand on; each field is filled by the stage named beside it, `metrics` by all."""

    cfg: DemoConfig
    out: Path
    metrics: dict[str, Any] = field(default_factory=dict)  # "group/name" -> value, written to metrics.json
    data: Optional[EmojiSummary] = None  # data
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)  # data: split -> rows
    templates: tuple[str, ...] = ()  # data: the dataset's zero-shot prompts (templates.txt)
    embedder: Optional[Embedder] = None  # evaluate: the trained model
    few_shot: Optional[pd.DataFrame] = None  # evaluate: top-1 per (k, method)
    index: Optional[SearchIndex] = None  # index
    search: dict[str, list[tuple[str, float]]] = field(default_factory=dict)  # search: query -> top 3 (caption, score)


@dataclass
class DemoResult:
    """Where the demo wrote things and the headline numbers it printed."""

    out: Path
    metrics: dict[str, Any]
    seconds: float

    def headline(self) -> str:
        lines = ["| unseen-emoji test split | value | chance |", "|---|---|---|"]
        for label, key in HEADLINE:
            group, name = key.split("/")
            chance = self.metrics.get(f"{group}/chance_{name}", "")
            chance = f"{chance:.4f}" if isinstance(chance, float) else chance
            lines.append(f"| {label} | {self.metrics.get(key, float('nan')):.4f} | {chance} |")
        return "\n".join(lines)


def _say(cfg: DemoConfig, step: int, text: str) -> None:
    if cfg.progress:
        print(f"[{step}/7] {text}", flush=True)


def run_demo(cfg: DemoConfig) -> DemoResult:
    """Run every stage and return the metrics (also written to `out/metrics.json`)."""
    start, out = time.perf_counter(), Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    stages: list[tuple[str, Callable[[DemoState], None]]] = [
        ("building the emoji dataset (OpenMoji + Noto glyphs, English + Korean captions)", _data),
        ("training the demo model", _train),
        ("evaluating on the unseen-emoji test split", _evaluate),
        ("building the search index", _index),
        ("searching by text (English and Korean) and by image", _search),
        ("reranking candidate images for prompts (best-of-N)", _rerank),
        ("writing metrics.json and report.html", _report),
    ]
    state = DemoState(cfg, out)
    for i, (what, stage) in enumerate(stages, 1):
        _say(cfg, i, what)
        stage(state)
    return DemoResult(out, state.metrics, time.perf_counter() - start)


def _data(state: DemoState) -> None:
    from ..data.datasets import build_emoji_dataset
    from ..data.datasets.emoji import TEMPLATES_FILE
    from ..data.tables import read_table
    from ..evaluate.zeroshot import load_templates

    cfg, data_dir = state.cfg, state.out / "data"
    state.data = build_emoji_dataset(data_dir, size=cfg.image_size, seed=cfg.seed, limit=cfg.limit,
                                     progress=cfg.progress)
    state.tables = {s: read_table(data_dir / f"{s}.csv") for s in ("train", "val", "test")}
    state.templates = load_templates(data_dir / TEMPLATES_FILE)  # what `clipkit eval --templates` would read
    state.metrics.update({f"data/{s}_rows": n for s, n in state.data.rows.items()})


def _train(state: DemoState) -> None:
    from ..train import TrainConfig, train

    cfg, out = state.cfg, state.out
    preset, extra = RECIPES[cfg.recipe]
    tcfg = TrainConfig(train_data=str(out / "data" / "train.csv"), val_data=str(out / "data" / "val.csv"),
                       val_templates=state.templates, output=str(out / "run"), model=preset, epochs=cfg.epochs,
                       max_steps=cfg.max_steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed,
                       checkpoint_every=1000, log_every=20, progress=cfg.progress, **extra)
    summary = train(tcfg)
    best = out / "run" / "best_model"
    src = best if best.exists() else Path(summary["model_dir"])
    with atomic_dir(out / "model") as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
    state.metrics.update({"train/steps": summary["steps"], "train/recipe": cfg.recipe,
                          "train/model_from": "best validation epoch" if best.exists() else "last step"})


def _flat(prefix: str, metrics: dict[str, Any]) -> dict[str, Any]:
    return {f"{prefix}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float, str))}


def _evaluate(state: DemoState) -> None:
    from ..embed import Embedder
    from ..evaluate.runners import eval_linear_probe, eval_retrieval, eval_zeroshot

    cfg, test, m = state.cfg, state.tables["test"], state.metrics
    emb = state.embedder = Embedder(state.out / "model", progress=False)
    m.update(_flat("zeroshot", eval_zeroshot(emb, test, templates=state.templates).metrics))
    m.update(_flat("retrieval", eval_retrieval(emb, test).metrics))
    for lang in sorted(test["lang"].unique()):
        m.update(_flat(f"retrieval_{lang}", eval_retrieval(emb, test[test["lang"] == lang]).metrics))
    probe = eval_linear_probe(emb, state.tables["train"], test, shots=cfg.shots, seeds=cfg.few_shot_seeds,
                              templates=state.templates)
    m.update(_flat("probe", probe.metrics))
    state.few_shot = probe.tables.get("few_shot")


def _index(state: DemoState) -> None:
    from ..search.index import SearchIndex

    rows = pd.concat([t.assign(split=s) for s, t in state.tables.items()])
    meta = rows[rows["lang"] == "en"].drop_duplicates("image")
    meta = meta[["image", "image_rel", "caption", "emoji", "label", "group", "style", "split"]].reset_index(drop=True)
    emb = state.embedder
    index = SearchIndex.build(emb.images(meta["image"].tolist()), meta, kind="auto", model_id=emb.model.fingerprint())
    index.save(state.out / "index")
    state.index = index
    state.metrics.update({"index/count": len(meta), "index/factory": index.factory})


def _search(state: DemoState) -> None:
    from ..report.plots import plot_retrieval_grid

    cfg, out, index, emb = state.cfg, state.out, state.index, state.embedder
    scores, ids = index.search(emb.texts(cfg.queries), k=6)
    results = index.results(scores, ids)
    plot_retrieval_grid(cfg.queries, [[(r["image"], r["score"]) for r in hits] for hits in results],
                        out / "search_text.png")
    query = state.tables["test"].iloc[0]
    scores, ids = index.search(emb.images([query["image"]]), k=7)
    hits = [r for r in index.results(scores, ids)[0] if r["image"] != query["image"]][:6]
    plot_retrieval_grid([f"image query: {query['caption']}"], [[(r["image"], r["score"]) for r in hits]],
                        out / "search_image.png")
    state.search = {q: [(r["caption"], round(r["score"], 3)) for r in hits_q[:3]] for q, hits_q in zip(cfg.queries, results)}
    if cfg.progress:
        for q, top in state.search.items():
            print(f"  {q!r:24s} -> " + "; ".join(f"{c} ({s})" for c, s in top))


def _rerank(state: DemoState) -> None:
    from ..evaluate.scoring import rerank
    from ..evaluate.tasks import best_of_n_accuracy, best_of_n_task
    from ..report.plots import contact_sheet

    cfg, out, test = state.cfg, state.out, state.tables["test"]
    sets = best_of_n_task(test[test["lang"] == "en"], out / "rerank", n=cfg.rerank_candidates,
                          num_prompts=cfg.rerank_prompts, seed=cfg.seed)
    rankings = []
    for i, s in enumerate(sets):
        ranked = rerank(state.embedder, s.prompt, s.candidates)
        rankings.append([r.image for r in ranked])
        if i < 2:
            contact_sheet(ranked, out / f"rerank_{i}.png", prompt=s.prompt)
    state.metrics.update(_flat("rerank", best_of_n_accuracy(rankings, sets)))


def _report(state: DemoState) -> None:
    from ..report.page import write_report
    from ..report.plots import plot_few_shot

    out = state.out
    write_json_atomic(out / "metrics.json", {k: json_safe(v) for k, v in state.metrics.items()})
    if state.few_shot is not None:
        plot_few_shot(state.few_shot, out / "few_shot.png")
    write_report(out / "report.html", "clipkit demo: CLIP on emoji",
                 "All figures are measured on the test split, whose emoji never appeared in training.",
                 demo_sections(state))


def _group(metrics: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The metrics under `prefix/`, without the prefix."""
    return {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith(prefix + "/")}


def demo_sections(state: DemoState) -> list[Section]:
    """The report's sections: headline numbers with chance, curves, search grids, rerank sheets."""
    from ..report.page import Section, metric_rows

    out, m, cfg, data = state.out, state.metrics, state.cfg, state.data
    zs, ret, rr = _group(m, "zeroshot"), _group(m, "retrieval"), _group(m, "rerank")
    metric_header = ["metric", "value", "chance"]
    sections = [Section("Data", [f"{data.total_rows} captioned rows from {sum(data.emoji.values())} emoji "
                                 f"({', '.join(f'{k}: {v}' for k, v in data.rows.items())}); "
                                 "split by emoji, so test emoji are unseen in training."])]
    sections.append(Section("Zero-shot subcategory labelling",
                            [f"Each label is the mean of {len(state.templates)} prompts (data/templates.txt): "
                             + ", ".join(repr(t) for t in state.templates) + "."],
                            tables=[(metric_header, metric_rows(zs, ["top1", "top5", "balanced_accuracy",
                                                                     "num_classes", "num_samples"]))]))
    langs = [[lang, _group(m, f"retrieval_{lang}").get("text_to_image_R@1"),
              _group(m, f"retrieval_{lang}").get("text_to_image_R@10")] for lang in ("en", "ko")]
    sections.append(Section("Retrieval", tables=[(metric_header, metric_rows(ret, [
        "text_to_image_R@1", "text_to_image_R@5", "text_to_image_R@10", "image_to_text_R@1", "image_to_text_R@5",
        "image_to_text_R@10", "text_to_image_median_rank", "num_images", "num_texts"])),
        (["caption language", "text->image R@1", "text->image R@10"], langs)]))
    if state.few_shot is not None:
        wide = state.few_shot.pivot(index="k", columns="method", values="mean").reset_index()
        sections.append(Section("Few-shot labelling", ["Top-1 on test emoji with k labelled training images per class "
                                                       f"(mean over seeds {list(cfg.few_shot_seeds)})."],
                                tables=[(list(wide.columns), [[int(r[0]), *r[1:]] for r in wide.values.tolist()])],
                                images=[(out / "few_shot.png", "top-1 vs shots per class")]))
    sections.append(Section("Training", [f"recipe {cfg.recipe}, {m.get('train/steps')} steps; "
                                         f"model from the {m.get('train/model_from')}"],
                            images=[(out / "run" / "loss_curve.png", "training loss")]))
    search_rows = [[q, "; ".join(f"{c} ({sc:.3f})" for c, sc in top)] for q, top in state.search.items()]
    sections.append(Section("Search", ["Text queries in English and Korean, then an image query, over the whole index."],
                            tables=[(["query", "top 3 results (cosine)"], search_rows)],
                            images=[(out / "search_text.png", "text queries"), (out / "search_image.png", "image query")]))
    sections.append(Section("Best-of-N reranking", [f"Each prompt's own image, degraded, among {rr.get('n_candidates')} "
                                                    "candidates from the same subcategory."],
                            tables=[(metric_header, metric_rows(rr, ["best_of_n_top1", "num_prompts"]))],
                            images=[(p, "ranked candidates") for p in sorted(out.glob("rerank_*.png"))]))
    return sections
