"""The README's main job: build the emoji data, train, evaluate on unseen emoji, index, search, rerank, report.

`run_demo(DemoConfig(out="demo"))` writes `demo/data`, `demo/model`, `demo/index`, `demo/metrics.json`
and `demo/report.html`. Every figure is measured on the test split, whose emoji were never trained on.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import pandas as pd

from ..fileio import atomic_dir, json_safe, write_json_atomic

TEXT_QUERIES = ["a red apple", "a smiling cat", "a flag of a country", "a train", "a heart",
                "사과", "고양이", "기차"]  # the last three: apple, cat, train in Korean
RECIPES = {  # preset, extra trainer options
    "minilm": ("tiny-minilm", {"lock_text": True}),
    "scratch": ("tiny", {}),
}


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
class DemoResult:
    """Where the demo wrote things and the headline numbers it printed."""

    out: Path
    metrics: dict[str, Any]
    seconds: float

    def headline(self) -> str:
        m = self.metrics
        rows = [("zero-shot top-1 (subcategory)", "zeroshot/top1"), ("zero-shot top-5", "zeroshot/top5"),
                ("text->image R@1", "retrieval/text_to_image_R@1"), ("text->image R@10", "retrieval/text_to_image_R@10"),
                ("image->text R@1", "retrieval/image_to_text_R@1"), ("image->text R@10", "retrieval/image_to_text_R@10"),
                ("best-of-N rerank top-1", "rerank/best_of_n_top1")]
        lines = ["| unseen-emoji test split | value | chance |", "|---|---|---|"]
        for label, key in rows:
            group, name = key.split("/")
            chance = m.get(f"{group}/chance_{name}", m.get(f"{group}/chance", ""))
            chance = f"{chance:.4f}" if isinstance(chance, float) else chance
            lines.append(f"| {label} | {m.get(key, float('nan')):.4f} | {chance} |")
        return "\n".join(lines)


def _say(cfg: DemoConfig, step: int, text: str) -> None:
    if cfg.progress:
        print(f"[{step}/7] {text}", flush=True)


def run_demo(cfg: DemoConfig) -> DemoResult:
    """Run every stage and return the metrics (also written to `out/metrics.json`)."""
    start, out = time.perf_counter(), Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    stages: list[tuple[str, Callable[..., Any]]] = [
        ("building the emoji dataset (OpenMoji + Noto glyphs, English + Korean captions)", _data),
        ("training the demo model", _train),
        ("evaluating on the unseen-emoji test split", _evaluate),
        ("building the search index", _index),
        ("searching by text (English and Korean) and by image", _search),
        ("reranking candidate images for prompts (best-of-N)", _rerank),
        ("writing metrics.json and report.html", _report),
    ]
    state: dict[str, Any] = {"cfg": cfg, "out": out, "metrics": {}}
    for i, (what, stage) in enumerate(stages, 1):
        _say(cfg, i, what)
        stage(state)
    return DemoResult(out, state["metrics"], time.perf_counter() - start)


def _data(state: dict[str, Any]) -> None:
    from ..data.tables import read_table
    from ..data.datasets import build_emoji_dataset

    cfg, out = state["cfg"], state["out"]
    summary = build_emoji_dataset(out / "data", size=cfg.image_size, seed=cfg.seed, limit=cfg.limit, progress=cfg.progress)
    state["data_summary"] = summary
    state["tables"] = {s: read_table(out / "data" / f"{s}.csv") for s in ("train", "val", "test")}
    state["metrics"].update({f"data/{s}_rows": n for s, n in summary.rows.items()})


def _train(state: dict[str, Any]) -> None:
    from ..train.trainer import TrainConfig, train

    cfg, out = state["cfg"], state["out"]
    preset, extra = RECIPES[cfg.recipe]
    tcfg = TrainConfig(train_data=str(out / "data" / "train.csv"), val_data=str(out / "data" / "val.csv"),
                       output=str(out / "run"), model=preset, epochs=cfg.epochs, max_steps=cfg.max_steps,
                       batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed, checkpoint_every=1000,
                       log_every=20, progress=cfg.progress, **extra)
    summary = train(tcfg)
    best = out / "run" / "best_model"
    src = best if best.exists() else Path(summary["model_dir"])
    with atomic_dir(out / "model") as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
    state["metrics"].update({"train/steps": summary["steps"], "train/recipe": cfg.recipe,
                             "train/model_from": "best validation epoch" if best.exists() else "last step"})


def _flat(prefix: str, metrics: dict[str, Any]) -> dict[str, Any]:
    return {f"{prefix}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float, str))}


def _evaluate(state: dict[str, Any]) -> None:
    from ..embed import Embedder
    from ..evaluate.runners import eval_linear_probe, eval_retrieval, eval_zeroshot

    cfg, out, tables = state["cfg"], state["out"], state["tables"]
    emb = Embedder(out / "model", progress=False)
    test = tables["test"]
    state["embedder"] = emb
    m = state["metrics"]
    m.update(_flat("zeroshot", eval_zeroshot(emb, test).metrics))
    retrieval = eval_retrieval(emb, test)
    state["retrieval_examples"] = retrieval.examples
    m.update(_flat("retrieval", retrieval.metrics))
    for lang in sorted(test["lang"].unique()):
        m.update(_flat(f"retrieval_{lang}", eval_retrieval(emb, test[test["lang"] == lang]).metrics))
    probe = eval_linear_probe(emb, tables["train"], test, shots=cfg.shots, seeds=cfg.few_shot_seeds)
    m.update(_flat("probe", probe.metrics))
    state["few_shot"] = probe.tables.get("few_shot")


def _index(state: dict[str, Any]) -> None:
    from ..search.index import SearchIndex

    out, tables, emb = state["out"], state["tables"], state["embedder"]
    rows = pd.concat([t.assign(split=s) for s, t in tables.items()])
    meta = rows[rows["lang"] == "en"].drop_duplicates("image")
    meta = meta.rename(columns={"image": "path"})[["path", "caption", "emoji", "label", "group", "style", "split"]]
    vectors = emb.images(meta["path"].tolist())
    index = SearchIndex.build(vectors, meta.reset_index(drop=True), kind="auto", model_id=emb.model.fingerprint())
    index.save(out / "index")
    state["index"] = index
    state["metrics"].update({"index/count": len(meta), "index/factory": index.factory})


def _search(state: dict[str, Any]) -> None:
    from ..report.plots import plot_retrieval_grid

    cfg, out, index, emb = state["cfg"], state["out"], state["index"], state["embedder"]
    scores, ids = index.search(emb.texts(cfg.queries), k=6)
    results = index.results(scores, ids)
    grid = [[(r["path"], r["score"]) for r in hits] for hits in results]
    plot_retrieval_grid(cfg.queries, grid, out / "search_text.png")
    query = state["tables"]["test"].iloc[0]
    scores, ids = index.search(emb.images([query["image"]]), k=7)
    hits = [r for r in index.results(scores, ids)[0] if r["path"] != query["image"]][:6]
    plot_retrieval_grid([f"image query: {query['caption']}"], [[(r["path"], r["score"]) for r in hits]], out / "search_image.png")
    state["search"] = {q: [(r["caption"], round(r["score"], 3)) for r in hits_q[:3]] for q, hits_q in zip(cfg.queries, results)}
    if cfg.progress:
        for q, top in state["search"].items():
            print(f"  {q!r:24s} -> " + "; ".join(f"{c} ({s})" for c, s in top))


def _rerank(state: dict[str, Any]) -> None:
    from ..evaluate.scoring import rerank
    from ..report.plots import contact_sheet
    from ..evaluate.tasks import best_of_n_accuracy, best_of_n_task

    cfg, out, emb = state["cfg"], state["out"], state["embedder"]
    test = state["tables"]["test"]
    sets = best_of_n_task(test[test["lang"] == "en"], out / "rerank", n=cfg.rerank_candidates,
                          num_prompts=cfg.rerank_prompts, seed=cfg.seed)
    rankings = []
    for i, s in enumerate(sets):
        ranked = rerank(emb, s.prompt, s.candidates)
        rankings.append([r.image for r in ranked])
        if i < 2:
            contact_sheet(ranked, out / f"rerank_{i}.png", prompt=s.prompt)
    state["metrics"].update(_flat("rerank", best_of_n_accuracy(rankings, sets)))


def _report(state: dict[str, Any]) -> None:
    from ..report.page import write_report

    out, m = state["out"], state["metrics"]
    write_json_atomic(out / "metrics.json", {k: json_safe(v) for k, v in m.items()})
    write_report(out / "report.html", "clipkit demo: CLIP on emoji",
                 "All figures are measured on the test split, whose emoji never appeared in training.",
                 demo_sections(state))


def demo_sections(state: dict[str, Any]) -> list[Any]:
    """The report's sections: headline numbers with chance, curves, search grids, rerank sheets."""
    from ..report.plots import plot_few_shot
    from ..report.page import Section, metric_rows

    out, m, cfg = state["out"], state["metrics"], state["cfg"]
    pick = lambda prefix: {k.split("/", 1)[1]: v for k, v in m.items() if k.startswith(prefix + "/")}  # noqa: E731
    zs, ret, rr = pick("zeroshot"), pick("retrieval"), pick("rerank")
    data = state["data_summary"]
    sections = [Section("Data", [f"{data.total_rows} captioned rows from {sum(data.emoji.values())} emoji "
                                 f"({', '.join(f'{k}: {v}' for k, v in data.rows.items())}); "
                                 "split by emoji, so test emoji are unseen in training."])]
    sections.append(Section("Zero-shot subcategory labelling", tables=[(["metric", "value", "chance"],
                            metric_rows(zs, ["top1", "top5", "balanced_accuracy", "num_classes", "num_samples"]))]))
    langs = [[lang, pick(f"retrieval_{lang}").get("text_to_image_R@1"), pick(f"retrieval_{lang}").get("text_to_image_R@10")]
             for lang in ("en", "ko")]
    sections.append(Section("Retrieval", tables=[(["metric", "value", "chance"], metric_rows(ret, [
        "text_to_image_R@1", "text_to_image_R@5", "text_to_image_R@10", "image_to_text_R@1", "image_to_text_R@5",
        "image_to_text_R@10", "text_to_image_median_rank", "num_images", "num_texts"])),
        (["caption language", "text->image R@1", "text->image R@10"], langs)]))
    if state.get("few_shot") is not None:
        plot_few_shot(state["few_shot"], out / "few_shot.png")
        wide = state["few_shot"].pivot(index="k", columns="method", values="mean").reset_index()
        sections.append(Section("Few-shot labelling", ["Top-1 on test emoji with k labelled training images per class "
                                                       f"(mean over seeds {list(cfg.few_shot_seeds)})."],
                                tables=[(list(wide.columns), [[int(r[0]), *r[1:]] for r in wide.values.tolist()])],
                                images=[(out / "few_shot.png", "top-1 vs shots per class")]))
    sections.append(Section("Training", [f"recipe {cfg.recipe}, {m.get('train/steps')} steps; model from the {m.get('train/model_from')}"],
                            images=[(out / "run" / "loss_curve.png", "training loss")]))
    search_rows = [[q, "; ".join(f"{c} ({sc:.3f})" for c, sc in top)] for q, top in state.get("search", {}).items()]
    sections.append(Section("Search", ["Text queries in English and Korean, then an image query, over the whole index."],
                            tables=[(["query", "top 3 results (cosine)"], search_rows)],
                            images=[(out / "search_text.png", "text queries"), (out / "search_image.png", "image query")]))
    sections.append(Section("Best-of-N reranking", [f"Each prompt's own image, degraded, among {rr.get('n_candidates')} "
                                                    f"candidates from the same subcategory."],
                            tables=[(["metric", "value", "chance"], [["best_of_n_top1", rr.get("best_of_n_top1"), rr.get("chance")],
                                                                     ["prompts", rr.get("num_prompts"), ""]])],
                            images=[(p, "ranked candidates") for p in sorted(out.glob("rerank_*.png"))]))
    return sections
