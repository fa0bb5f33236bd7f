"""What distilling a text tower into Korean buys: plain-name text->image recall in English and Korean on the
emoji test split (concepts never trained on, never in the parallel data), before and after, plus the top 5
of the demo's short Korean queries over every image. One JSON line per run is appended to --log.

    clipkit data emoji --out emoji && clipkit train ... --output runs/emoji       # or a demo's data/ and model/
    python benchmarks/bench_distill.py --data emoji --model runs/emoji/best_model --out /tmp/d --steps 300
    python benchmarks/bench_distill.py ... --with-test-names      # the test emoji's names in, labelled as such
    python benchmarks/bench_distill.py ... --tune tower   # train the whole text tower, not only the added tokens
    python benchmarks/bench_distill.py ... --student bpe --lr 1e-3  # a fresh text tower with a byte-level BPE
    python benchmarks/bench_distill.py ... --student pretrained \
        --student-tower hf-hub:sentence-transformers/paraphrase-multilingual-MiniLM-L12-v2  # a multilingual tower
    python benchmarks/bench_distill.py ... --keywords     # + CLDR keyword-list pairs and the keywords aligned in them
    python benchmarks/distill_coverage.py --data emoji --model /tmp/d/run/model --parallel /tmp/d/pairs.tsv  # where Korean is lost
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Optional

import pandas as pd

from clipkit.data.datasets.emoji.catalog import load_emoji
from clipkit.data.datasets.emoji.keywords import load_keywords
from clipkit.data.datasets.emoji.styles import default_packs_dir
from clipkit.data.datasets.parallel import build_parallel
from clipkit.embed import Embedder
from clipkit.evaluate.runners import eval_retrieval
from clipkit.search.index import SearchIndex
from clipkit.train.distill import DistillConfig, distill_text

QUERIES = ["사과", "고양이", "기차", "apple", "cat", "train"]  # apple, cat, train: Korean, then English


def keywords(wanted: bool) -> Optional[dict]:
    """English and Korean CLDR keywords from the packs folder's emojibase-data, or None (not wanted)."""
    if not wanted:
        return None
    found = load_keywords(default_packs_dir(), load_emoji(), ("en", "ko"))
    if isinstance(found, str):
        raise SystemExit(found)
    return found[0]


def read_splits(data: Path) -> dict[str, pd.DataFrame]:
    splits = ("train", "val", "test") + (("holdout",) if (data / "holdout.csv").exists() else ())  # + unseen style
    tables = {s: pd.read_csv(data / f"{s}.csv", keep_default_na=False) for s in splits}
    for t in tables.values():
        t["image"] = str(data) + "/" + t["image"]
    return tables


def evaluate(model: str, tables: dict[str, pd.DataFrame]) -> dict:
    """R@1/R@10 of plain-name queries per language on the test split (`style_`: its emoji in the held-out style),
    and the top 5 of QUERIES over the images of the seen styles."""
    emb, test = Embedder(model, progress=False), tables["test"]
    scopes = {"": test}
    if "holdout" in tables:
        scopes["style_"] = tables["holdout"][tables["holdout"]["emoji"].isin(set(test["emoji"]))]
    out = {}
    for prefix, table in scopes.items():
        for lang in ("en", "ko"):
            m = eval_retrieval(emb, table[(table["lang"] == lang) & (table["form"] == "name")]).metrics
            out[f"{prefix}name_{lang}/R@1"] = m["text_to_image_R@1"]
            out[f"{prefix}name_{lang}/R@10"] = m["text_to_image_R@10"]
    rows = pd.concat(tables[s] for s in ("train", "val", "test"))
    rows = rows[(rows["lang"] == "en") & (rows["form"] == "name")].drop_duplicates("image").reset_index(drop=True)
    index = SearchIndex.build(emb.images(rows["image"].tolist()), rows[["caption", "style"]], kind="flat")
    scores, ids = index.search(emb.texts(QUERIES), k=5)
    out["top5"] = {q: [r["caption"] for r in hits] for q, hits in zip(QUERIES, index.results(scores, ids))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, type=Path, help="a built emoji dataset (train/val/test.csv)")
    ap.add_argument("--model", required=True, help="the teacher: a model trained on that dataset")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, help="default: DistillConfig's (1e-3 for --tune tokens, 1e-4 for tower)")
    ap.add_argument("--tune", choices=["tokens", "tower"], help="default: DistillConfig's (tokens for extend)")
    ap.add_argument("--student", choices=["extend", "bpe", "pretrained"], default="extend")
    ap.add_argument("--student-tower", help="pretrained: a transformers text model (dir, hf:/dir, hf-hub:org/name)")
    ap.add_argument("--english-fraction", type=float, default=0.25)
    ap.add_argument("--with-test-names", action="store_true", help="keep the test emoji's names in the pairs")
    ap.add_argument("--skip-teacher", action="store_true")
    ap.add_argument("--keywords", action="store_true", help="add CLDR keyword pairs (emojibase-data in the packs folder)")
    ap.add_argument("--no-word-tokens", dest="word_tokens", action="store_false",
                    help="extend: keep single-word pairs' words as syllables (DistillConfig.word_tokens off)")
    ap.add_argument("--seed", type=int, default=0, help="the distillation's seed (held-out split, batches)")
    ap.add_argument("--log", type=Path, default=Path("distill.jsonl"))
    args = ap.parse_args()
    tables = read_splits(args.data)
    exclude = set() if args.with_test_names else set(tables["test"]["emoji"])
    pairs = build_parallel(args.out / "pairs.tsv", ("ko",), exclude=exclude, keywords=keywords(args.keywords))
    record = {"student_kind": args.student, "student_tower": args.student_tower, "steps": args.steps, "lr": args.lr,
              "english_fraction": args.english_fraction, "word_tokens": args.word_tokens, "seed": args.seed,
              "pairs": pairs.pairs, "test_names_in_pairs": args.with_test_names, "keywords": args.keywords,
              "machine": platform.processor() or platform.machine()}
    if not args.skip_teacher:
        record["teacher"] = evaluate(args.model, tables)
        print("teacher", json.dumps(record["teacher"], ensure_ascii=False), flush=True)
    t0 = time.perf_counter()
    summary = distill_text(DistillConfig(model=args.model, parallel=str(args.out / "pairs.tsv"),
                                         output=str(args.out / "run"), steps=args.steps, lr=args.lr, progress=False,
                                         student=args.student, student_tower=args.student_tower, tune=args.tune,
                                         english_fraction=args.english_fraction,
                                         word_tokens=args.word_tokens, seed=args.seed))
    record["distill_seconds"] = round(time.perf_counter() - t0, 1)
    record["tune"] = summary["tune"]
    record["held_out_distance"] = [summary["held_out_distance_before"], summary["held_out_distance"]]
    record["tokenizer"] = {"added_tokens": summary["added_tokens"], "vocab": summary["vocab"]}
    record["student"] = evaluate(summary["model_dir"], tables)
    print("student", json.dumps(record["student"], ensure_ascii=False), flush=True)
    with args.log.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
