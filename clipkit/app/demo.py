"""The README's main job: build the emoji data, train, evaluate on unseen emoji, index, search, rerank, report.

`run_demo(DemoConfig(out="demo"))` writes `demo/data`, `demo/model`, `demo/index`, `demo/metrics.json`
and `demo/report.html`. Every figure is measured on emoji never trained on (the test split), drawn in the
art styles trained on and in one art style never seen in training (the held-out style), with the queries
phrased as plain names, as the training template, and in Korean.
"""
from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import numpy as np
import pandas as pd

from ..data.datasets.emoji import DEFAULT_HOLDOUT, DEFAULT_STYLES, FORMS
from ..fileio import atomic_dir, json_safe, write_json_atomic, write_text_atomic

if TYPE_CHECKING:
    from ..data.datasets import EmojiSummary
    from ..embed import Embedder
    from ..report.page import Section
    from ..search.index import SearchIndex

TEXT_QUERIES = ["a red apple", "a smiling cat", "a flag of a country", "a train", "a heart",
                "사과", "고양이", "기차"]  # the last three: apple, cat, train in Korean
MULTILINGUAL = "model_multilingual"  # the trained model with the distilled text tower (same image tower)
UNLOCKED = 4  # the image tower's trainable layer groups in the pretrained recipe (Lite2 has 22: the stem, then
# 21 blocks, the head joining the last; timm's group_matcher, which open_clip counts by too)
RECIPES = {  # preset, extra trainer options (the choice: benchmarks/RESULTS.md, "A pretrained image tower")
    # ImageNet EfficientNet-Lite2 + MiniLM: text locked, image locked but for its last UNLOCKED layer groups
    "pretrained": ("lite2-minilm", {"lock_text": True, "style_augment": True, "lock_image_unlocked_groups": UNLOCKED,
                                    "lock_image_freeze_bn_stats": True}),
    "minilm": ("tiny-minilm", {"lock_text": True, "style_augment": True, "patch_dropout": 0.5}),  # random ViT
    "scratch": ("tiny", {"style_augment": True}),
}
QUERIES = {  # query set -> (caption language, caption form) of the rows it is made of
    "name_en": ("en", "name"), "template_en": ("en", "template"), "name_ko": ("ko", "name"),
}
SCOPE_QUERIES = {"test": tuple(QUERIES), "style_test": tuple(QUERIES), "style": ("name_en",)}  # what each scope asks
# headline rows: (label, metric group, metric); each is shown for the seen styles and for the unseen style
HEADLINE = [("zero-shot subcategory top-1", "zeroshot", "top1"), ("zero-shot top-5", "zeroshot", "top5"),
            ("text->image R@1, plain English names", "name_en", "text_to_image_R@1"),
            ("text->image R@10, plain English names", "name_en", "text_to_image_R@10"),
            ("text->image R@1, templated (\"a X emoji\")", "template_en", "text_to_image_R@1"),
            ("text->image R@1, plain Korean names", "name_ko", "text_to_image_R@1"),
            ("image->text R@1, plain English names", "name_en", "image_to_text_R@1")]


def metric_group(scope: str, group: str) -> str:
    """A metrics.json group: scope "test" (seen styles, unseen emoji), "style" (the unseen style, every emoji)
    or "style_test" (unseen style, unseen emoji), then the figure's group; the test split's zero-shot figures
    keep their first name, `zeroshot/...`."""
    return group if (scope, group) == ("test", "zeroshot") else f"{scope}_{group}"


def metric_key(scope: str, group: str, name: str) -> str:
    return f"{metric_group(scope, group)}/{name}"


@dataclass
class DemoConfig:
    """Knobs of the demo; the defaults are the README's run (about 8 minutes on 2 CPU cores, see its Results)."""

    out: str = "demo"
    seed: int = 0
    recipe: str = "pretrained"
    max_steps: int = 800  # fixed compute: more styles or captions do not lengthen training
    batch_size: int = 64
    lr: float = 5e-4
    image_size: int = 64
    styles: tuple[str, ...] = DEFAULT_STYLES
    holdout: Optional[str] = DEFAULT_HOLDOUT  # the art style never trained on; None: train on every style
    packs: Optional[str] = None  # folder of npm emoji packs (None: $CLIPKIT_EMOJI_PACKS or ~/.cache/clipkit/...)
    train_forms: tuple[str, ...] = FORMS  # caption forms trained on (name, template, variant)
    limit: Optional[int] = None  # emoji subset (tests)
    shots: tuple[int, ...] = (1, 2, 4, 8, 16)
    few_shot_seeds: tuple[int, ...] = (0, 1)
    rerank_candidates: int = 8
    rerank_prompts: int = 100
    queries: list[str] = field(default_factory=lambda: list(TEXT_QUERIES))
    distill_steps: int = 600  # the multilingual text tower's distillation (0: none); the image tower is shared
    distill_langs: tuple[str, ...] = ("ko",)
    distill_student_tower: Optional[str] = None  # a transformers text model that reads those languages (hf-hub:...)
    # as the student, trained whole with a new projection; None: the teacher's tower, tokenizer extended
    progress: bool = True


@dataclass
class DemoState:
    """What the stages hand on; each field is filled by the stage named beside it, `metrics` by all."""

    cfg: DemoConfig
    out: Path
    metrics: dict[str, Any] = field(default_factory=dict)  # "group/name" -> value, written to metrics.json
    data: Optional[EmojiSummary] = None  # data
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)  # data: split (and "holdout") -> rows
    templates: tuple[str, ...] = ()  # data: the dataset's zero-shot prompts (templates.txt)
    embedder: Optional[Embedder] = None  # evaluate: the trained model
    queries: Optional[Embedder] = None  # evaluate: the model text queries go through (the distilled one if any)
    few_shot: Optional[pd.DataFrame] = None  # evaluate: top-1 per (k, method)
    index: Optional[SearchIndex] = None  # index
    search: dict[str, list[tuple[str, float]]] = field(default_factory=dict)  # search: query -> top 3 (caption, score)


def _cell(metrics: dict[str, Any], key: str) -> str:
    value = metrics.get(key)
    return f"{value:.4f}" if isinstance(value, float) else "n/a"


@dataclass
class DemoResult:
    """Where the demo wrote things and the headline numbers it printed."""

    out: Path
    metrics: dict[str, Any]
    seconds: float

    def headline(self) -> str:
        """The README's table: each figure on the seen styles' unseen emoji and on the unseen style's."""
        m, style = self.metrics, self.metrics.get("data/holdout") or "none installed"
        lines = [f"| unseen emoji | seen styles | chance | unseen style ({style}) | chance |", "|---|---|---|---|---|"]
        rows = [("", label, group, name) for label, group, name in HEADLINE]
        if "distill/steps" in m:
            rows += [("multilingual_", f"text->image R@10, plain {lang} names, distilled text tower", group,
                      "text_to_image_R@10") for lang, group in (("English", "name_en"), ("Korean", "name_ko"))]
        for prefix, label, group, name in rows:
            cells = [_cell(m, prefix + metric_key(scope, group, key)) for scope in ("test", "style_test")
                     for key in (name, f"chance_{name}")]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append(f"| best-of-{m.get('rerank/n_candidates', 8)} rerank top-1 | {_cell(m, 'rerank/best_of_n_top1')} "
                     f"| {_cell(m, 'rerank/chance_best_of_n_top1')} | | |")
        return "\n".join(lines + ["", f"On {machine_line(m)}."])


def _say(cfg: DemoConfig, step: int, total: int, text: str) -> None:
    if cfg.progress:
        print(f"[{step}/{total}] {text}", flush=True)


def run_demo(cfg: DemoConfig) -> DemoResult:
    """Run every stage and return the metrics (also written to `out/metrics.json`)."""
    start, out = time.perf_counter(), Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    stages: list[tuple[str, Callable[[DemoState], None]]] = [
        ("building the emoji dataset (every installed art style, English + Korean captions)", _data),
        (f"training the demo model ({cfg.max_steps} steps)", _train),
        (f"distilling its text tower into {', '.join(cfg.distill_langs)} ({cfg.distill_steps} steps)", _distill),
        ("evaluating on unseen emoji, in the seen styles and in the unseen style", _evaluate),
        ("building the search index", _index),
        ("searching by text (English and Korean) and by image", _search),
        ("reranking candidate images for prompts (best-of-N)", _rerank),
        ("writing metrics.json and report.html", _report),
    ]
    state = DemoState(cfg, out)
    _machine(state)
    stages = [(what, stage) for what, stage in stages if stage is not _distill or cfg.distill_steps]
    for i, (what, stage) in enumerate(stages, 1):
        _say(cfg, i, len(stages), what)
        t0 = time.perf_counter()
        stage(state)
        # every stage's wall time; the report stage's own is missing from metrics.json, which it writes
        state.metrics[f"seconds/{stage.__name__.lstrip('_')}"] = round(time.perf_counter() - t0, 1)
    return DemoResult(out, state.metrics, time.perf_counter() - start)


def _machine(state: DemoState) -> None:
    """Record (and say) the processor and the precisions `auto` chose: the trained figures depend on them."""
    from ..embed import default_device
    from ..model.config import get_preset
    from ..model.precision import hardware_summary
    from ..model.towers import build_image_tower

    vision = dataclasses.replace(get_preset(RECIPES[state.cfg.recipe][0]).vision, pretrained=None)
    hw = hardware_summary(default_device(), build_image_tower(vision)[0])  # auto's choice depends on the tower
    state.metrics.update({f"machine/{k}": v for k, v in hw.items()})
    if state.cfg.progress:
        print(f"  {machine_line(state.metrics)}", flush=True)


def machine_line(metrics: dict[str, Any]) -> str:
    """One line on where the figures come from, e.g. "AMD EPYC, 2 threads, no native bf16: trained in fp32, ..."."""
    if "machine/device" not in metrics:
        return "machine not recorded"
    bf16 = "native bf16" if metrics["machine/native_bf16"] else "no native bf16"
    return (f"{metrics['machine/device']}, {metrics['machine/threads']} threads, {bf16}: trained in "
            f"{metrics['machine/train_precision']}, image tower {metrics['machine/image_precision']}, text tower "
            f"{metrics['machine/text_precision']} (precision auto)")


def _data(state: DemoState) -> None:
    from ..data.datasets import build_emoji_dataset
    from ..data.datasets.emoji import HOLDOUT_FILE, TEMPLATES_FILE
    from ..data.tables import read_table
    from ..evaluate.zeroshot import load_templates

    cfg, data_dir = state.cfg, state.out / "data"
    data = state.data = build_emoji_dataset(data_dir, size=cfg.image_size, seed=cfg.seed, limit=cfg.limit,
                                            styles=cfg.styles, holdout=cfg.holdout, packs=cfg.packs,
                                            progress=cfg.progress)
    if cfg.progress:
        print(f"  styles: {', '.join(f'{s} ({n} images)' for s, n in data.images.items())}; "
              f"held out: {data.holdout or 'none'}", flush=True)
        for style, reason in data.skipped_styles.items():
            print(f"  style {style} skipped: {reason}", flush=True)
        for note in data.notes:
            print(f"  note: {note}", flush=True)
    files = {s: data_dir / f"{s}.csv" for s in ("train", "val", "test")}
    if data.holdout:
        files["holdout"] = data_dir / HOLDOUT_FILE
    state.tables = {s: read_table(f) for s, f in files.items()}
    state.templates = load_templates(data_dir / TEMPLATES_FILE)  # what `clipkit eval --templates` would read
    state.metrics.update({f"data/{s}_rows": n for s, n in data.rows.items()})
    state.metrics.update({"data/styles": ",".join(data.styles), "data/holdout": data.holdout or "",
                          "data/skipped_styles": ",".join(data.skipped_styles)})


def _train_table(state: DemoState) -> Path:
    """The training table: train.csv, or its rows of the chosen caption forms (written beside it)."""
    cfg, data_dir = state.cfg, state.out / "data"
    if set(cfg.train_forms) >= set(FORMS):
        return data_dir / "train.csv"
    table = pd.read_csv(data_dir / "train.csv", keep_default_na=False)
    path = data_dir / f"train_{'_'.join(cfg.train_forms)}.csv"
    write_text_atomic(path, table[table["form"].isin(cfg.train_forms)].to_csv(index=False, lineterminator="\n"))
    return path


def _train(state: DemoState) -> None:
    from ..train import TrainConfig, train

    cfg, out = state.cfg, state.out
    preset, extra = RECIPES[cfg.recipe]
    if extra.get("patch_dropout"):  # FLIP's unmasked tuning over the last fifth (benchmarks/RESULTS.md)
        extra = {**extra, "unmasked_steps": cfg.max_steps // 5}
    tcfg = TrainConfig(train_data=str(_train_table(state)), val_data=str(out / "data" / "val.csv"),
                       val_templates=state.templates, output=str(out / "run"), model=preset,
                       max_steps=cfg.max_steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed,
                       checkpoint_every=1000, log_every=20, progress=cfg.progress, **extra)
    summary = train(tcfg)
    # the last step's model, not run/best_model: the schedule is fixed (cosine to zero at max_steps) and the two
    # or three validations of 800 steps can pick an unannealed model by a few val images (benchmarks/RESULTS.md)
    with atomic_dir(out / "model") as tmp:
        shutil.copytree(summary["model_dir"], tmp, dirs_exist_ok=True)
    state.metrics.update({"train/steps": summary["steps"], "train/recipe": cfg.recipe, "train/model_from": "last step"})


def _distill(state: DemoState) -> None:
    """A multilingual text tower for the trained model, from the emoji package's names (never the test emoji's)."""
    from ..data.datasets.parallel import build_parallel
    from ..train.distill import DistillConfig, distill_text

    cfg, out = state.cfg, state.out
    test_emoji = set(state.tables["test"]["emoji"])
    pairs = build_parallel(out / "data" / "parallel.tsv", cfg.distill_langs, exclude=test_emoji)
    tower = cfg.distill_student_tower
    summary = distill_text(DistillConfig(model=str(out / "model"), parallel=pairs.path, output=str(out / "distill"),
                                         steps=cfg.distill_steps, seed=cfg.seed, progress=cfg.progress,
                                         student="pretrained" if tower else "extend", student_tower=tower))
    with atomic_dir(out / MULTILINGUAL) as tmp:
        shutil.copytree(summary["model_dir"], tmp, dirs_exist_ok=True)
    state.metrics.update({f"distill/pairs_{k.replace('/', '_')}": n for k, n in pairs.pairs.items()})
    state.metrics.update({"distill/steps": summary["steps"], "distill/excluded_emoji": len(test_emoji),
                          "distill/word_tokens": summary["word_tokens"], "distill/tune": summary["tune"],
                          "distill/student": tower or "extend",
                          "distill/held_out_distance_before": summary["held_out_distance_before"],
                          "distill/held_out_distance": summary["held_out_distance"]})


def _flat(prefix: str, metrics: dict[str, Any]) -> dict[str, Any]:
    return {f"{prefix}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float, str))}


def _scopes(tables: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """The evaluation sets: the test split (seen styles), and the unseen style with every emoji and with the
    test split's emoji only."""
    scopes = {"test": tables["test"]}
    if "holdout" in tables:
        held = tables["holdout"]
        scopes.update(style=held, style_test=held[held["split"] == "test"])
    return {k: v for k, v in scopes.items() if len(v)}


def evaluate_scopes(emb: Embedder, tables: dict[str, pd.DataFrame], templates: Sequence[str]) -> dict[str, Any]:
    """Zero-shot labelling and retrieval by query set (plain names, templates, Korean) on every scope, plus the
    first demo's figures (`retrieval*/`: the templated captions of the test split)."""
    from ..evaluate.runners import eval_retrieval, eval_zeroshot

    m: dict[str, Any] = {}
    for scope, table in _scopes(tables).items():
        images = table.drop_duplicates("image")
        m.update(_flat(metric_group(scope, "zeroshot"), eval_zeroshot(emb, images, templates=templates).metrics))
    m.update(evaluate_queries(emb, tables))
    test = tables["test"]
    templated = test[test["form"] == "template"]
    m.update(_flat("retrieval", eval_retrieval(emb, templated).metrics))
    for lang in sorted(templated["lang"].unique()):
        m.update(_flat(f"retrieval_{lang}", eval_retrieval(emb, templated[templated["lang"] == lang]).metrics))
    return m


def evaluate_queries(emb: Embedder, tables: dict[str, pd.DataFrame], prefix: str = "") -> dict[str, Any]:
    """Text->image retrieval by query set on every scope (what a second text tower changes), under `prefix`."""
    from ..evaluate.runners import eval_retrieval

    m: dict[str, Any] = {}
    for scope, table in _scopes(tables).items():
        for query in SCOPE_QUERIES[scope]:
            lang, form = QUERIES[query]
            rows = table[(table["lang"] == lang) & (table["form"] == form)]
            if len(rows):
                m.update(_flat(prefix + metric_group(scope, query), eval_retrieval(emb, rows).metrics))
    return m


class MemoEmbedder:
    """An Embedder that embeds each image path and each text once: the demo's evaluations ask for the same
    images and captions many times over. Everything else is the wrapped Embedder's."""

    def __init__(self, embedder: Embedder, same_images: Optional["MemoEmbedder"] = None) -> None:
        self.embedder = embedder
        self.failures: list[tuple[int, Exception]] = []
        # path -> embedding, or the load error; shared with `same_images` (a model with the same image tower)
        self._images: dict[str, Any] = same_images._images if same_images is not None else {}
        self._texts: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.embedder, name)

    def texts(self, strings: Sequence[str]) -> np.ndarray:
        new = [t for t in dict.fromkeys(strings) if t not in self._texts]
        if new:
            self._texts.update(zip(new, self.embedder.texts(new)))
        return np.stack([self._texts[t] for t in strings]) if len(strings) else np.zeros((0, self.embedder.dim), np.float32)

    def images(self, items: Sequence[str], on_error: str = "raise") -> np.ndarray:
        keys = [str(p) for p in items]
        new = [p for p in dict.fromkeys(keys) if p not in self._images]
        if new:
            out = self.embedder.images(new, on_error="nan")
            errors = dict(self.embedder.failures)
            self._images.update((p, errors.get(i, out[i])) for i, p in enumerate(new))
        self.failures = [(i, v) for i, v in enumerate(self._images[p] for p in keys) if isinstance(v, Exception)]
        if self.failures and on_error == "raise":
            raise self.failures[0][1]
        nan = np.full(self.embedder.dim, np.nan, np.float32)
        return np.stack([nan if isinstance(v, Exception) else v for v in (self._images[p] for p in keys)]) \
            if keys else np.zeros((0, self.embedder.dim), np.float32)


def _evaluate(state: DemoState) -> None:
    from ..embed import Embedder
    from ..evaluate.runners import eval_linear_probe

    cfg, m = state.cfg, state.metrics
    emb = state.embedder = state.queries = MemoEmbedder(Embedder(state.out / "model", progress=False))
    m.update(evaluate_scopes(emb, state.tables, state.templates))
    if (state.out / MULTILINGUAL).exists():
        state.queries = MemoEmbedder(Embedder(state.out / MULTILINGUAL, progress=False), same_images=emb)
        m.update(evaluate_queries(state.queries, state.tables, "multilingual_"))
    train, test = (state.tables[s].drop_duplicates("image") for s in ("train", "test"))
    probe = eval_linear_probe(emb, train, test, shots=cfg.shots, seeds=cfg.few_shot_seeds, templates=state.templates)
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
    scores, ids = index.search(state.queries.texts(cfg.queries), k=6)
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
    prompts = test[(test["lang"] == "en") & (test["form"] == "template")]  # "a X emoji", as in the first demo
    sets = best_of_n_task(prompts, out / "rerank", n=cfg.rerank_candidates,
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
                 "All figures are measured on emoji that never appeared in training (the test split), drawn in the "
                 "art styles trained on and in an art style never trained on.", demo_sections(state))


def _group(metrics: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The metrics under `prefix/`, without the prefix."""
    return {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith(prefix + "/")}


def _data_section(data: EmojiSummary) -> Section:
    from ..report.page import Section

    lines = [f"{data.total_rows} captioned rows from {sum(data.emoji.values())} emoji "
             f"({', '.join(f'{k}: {v}' for k, v in data.rows.items())}); split by emoji, so test emoji are unseen in "
             "training. Each image is captioned by its plain name, templated phrases and its Korean name."]
    lines += [f"Style {s}: {n} images, {data.sources[s]['source']}" + (" (held out: never trained on)"
              if s == data.holdout else "") for s, n in data.images.items()]
    lines += [f"Style {s} not used: {reason}" for s, reason in data.skipped_styles.items()] + data.notes
    return Section("Data", lines)


def _style_section(m: dict[str, Any], data: EmojiSummary) -> Section:
    """Every figure on the seen styles and on the unseen style, by query set."""
    from ..report.page import Section

    scopes = [("test", "seen styles, unseen emoji"), ("style", f"unseen style ({data.holdout}), every emoji"),
              ("style_test", f"unseen style ({data.holdout}), unseen emoji")]
    rows = []
    for label, group, name in HEADLINE + [("text->image R@10, templated", "template_en", "text_to_image_R@10"),
                                          ("text->image R@10, plain Korean names", "name_ko", "text_to_image_R@10")]:
        cells = [m.get(metric_key(scope, group, name)) for scope, _ in scopes]
        rows.append([label, *cells, m.get(metric_key("style_test", group, f"chance_{name}"))])
    note = ("No art style was held out, so the unseen-style columns are empty." if not data.holdout else
            "Plain names are what a user types (\"red apple\"); templated is the phrase the first demo trained on "
            "(\"a red apple emoji\").")
    return Section("Unseen art style", [note], tables=[(["metric", *(t for _, t in scopes), "chance (unseen style, "
                                                         "unseen emoji)"], rows)])


def _multilingual_section(m: dict[str, Any], cfg: DemoConfig) -> Optional[Section]:
    """Text->image recall before and after distilling the text tower, by query language."""
    from ..report.page import Section

    if "distill/steps" not in m:
        return None
    rows = [[f"{label}, {query}", *(m.get(f"{p}{metric_key(scope, query, k)}") for p in ("", "multilingual_")
                                    for k in ("text_to_image_R@1", "text_to_image_R@10"))]
            for scope, label in (("test", "seen styles"), ("style_test", "unseen style")) for query in ("name_en", "name_ko")]
    pairs = {k.split("/", 1)[1]: v for k, v in m.items() if k.startswith("distill/pairs_")}
    note = (f"The text tower was distilled for {m['distill/steps']} steps on {sum(pairs.values())} parallel pairs "
            f"from the emoji package ({', '.join(f'{k}: {v}' for k, v in pairs.items())}), none naming a test emoji; "
            + (f"the student was the pretrained text tower {m['distill/student']}, trained whole with a new "
               "projection; " if m.get("distill/student", "extend") != "extend" else
               f"{m.get('distill/word_tokens', 0)} words of the single-word pairs started at their English word; ")
            + ("only the added tokens trained, so English queries embed exactly as before; "
               if m.get("distill/tune") == "tokens" else "")
            + f"the image tower is the same, so the index is unchanged. Search above uses {MULTILINGUAL}.")
    return Section(f"Queries in {', '.join(cfg.distill_langs)}: before and after distillation", [note],
                   tables=[(["unseen emoji, query set", "R@1 before", "R@10 before", "R@1 after", "R@10 after"], rows)])


def demo_sections(state: DemoState) -> list[Section]:
    """The report's sections: headline numbers with chance, curves, search grids, rerank sheets."""
    from ..report.page import Section, metric_rows

    out, m, cfg, data = state.out, state.metrics, state.cfg, state.data
    zs, ret, rr = _group(m, "zeroshot"), _group(m, "retrieval"), _group(m, "rerank")
    metric_header = ["metric", "value", "chance"]
    sections = [_data_section(data), _style_section(m, data)]
    sections += [s for s in [_multilingual_section(m, cfg)] if s is not None]
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
                                         f"model from the {m.get('train/model_from')}",
                                         f"On {machine_line(m)}: runs of the same seed in bf16 and in fp32 "
                                         "give different figures."],
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
