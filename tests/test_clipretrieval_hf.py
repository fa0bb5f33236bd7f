"""transformers' own `pipeline("zero-shot-image-classification", model=DIR)` on a model exported with
`clipkit convert --to hf` ranks the classes as `clipkit eval zeroshot` does with the same template (issue 15),
and an export whose tokenizer files are missing or wrong is refused, never written.

Without tokenizer files transformers builds an empty 2-token tokenizer silently and the pipeline scores every
label the same (checked below), so equal scores are what the ranking test must never accept.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import clipkit
from clipkit.cli import main
from clipkit.errors import CheckpointError
from helpers import random_image

LABELS = ["cat", "dog", "car", "tree", "sun"]
TEMPLATE = "a {}."  # short: the test model's context is 16 tokens, and the pipeline does not truncate


@pytest.fixture(scope="module")
def exported(tmp_path_factory, hf_clip_dir):
    """A clipkit model (converted from a random HF CLIP), its `convert --to hf` export, and a labelled table."""
    root = tmp_path_factory.mktemp("hfpipe")
    assert main(["convert", str(hf_clip_dir(257)), "--out", str(root / "ck")]) == 0
    assert main(["convert", str(root / "ck"), "--to", "hf", "--out", str(root / "hf")]) == 0
    rows = []
    for i in range(10):
        path = root / f"img{i}.png"
        random_image(i, (32, 32) if i % 2 else (48, 40)).save(path)  # 48x40: resize + centre crop too
        rows.append({"image": str(path), "caption": f"image {i}", "label": LABELS[i % len(LABELS)]})
    pd.DataFrame(rows).to_csv(root / "test.csv", index=False)
    (root / "templates.txt").write_text(TEMPLATE + "\n")
    return root, rows


def _pipeline_rankings(model_dir, rows) -> tuple[list[list[str]], list[list[float]]]:
    from PIL import Image
    from transformers import pipeline

    pipe = pipeline("zero-shot-image-classification", model=str(model_dir))
    out = [pipe(Image.open(r["image"]), candidate_labels=LABELS, hypothesis_template=TEMPLATE) for r in rows]
    return [[o["label"] for o in res] for res in out], [[o["score"] for o in res] for res in out]


def assert_real_scores(scores: list[list[float]]) -> None:
    """Not the empty-tokenizer failure: the labels of an image get different scores."""
    assert all(max(s) - min(s) > 1e-3 for s in scores), scores


def test_pipeline_ranks_like_eval_zeroshot(exported, capsys):
    from clipkit.evaluate.zeroshot import zero_shot_weights

    root, rows = exported
    ranked, scores = _pipeline_rankings(root / "hf", rows)
    assert_real_scores(scores)
    embedder = clipkit.Embedder(root / "ck", progress=False)  # the classifier `eval zeroshot` builds
    logits = embedder.images([r["image"] for r in rows]) @ zero_shot_weights(embedder.texts, LABELS, [TEMPLATE]).T
    assert ranked == [[LABELS[j] for j in np.argsort(-row)] for row in logits]
    capsys.readouterr()
    assert main(["eval", "zeroshot", "--model", str(root / "ck"), "--data", str(root / "test.csv"),
                 "--templates", str(root / "templates.txt"), "--json", str(root / "zs.json")]) == 0
    result = json.loads((root / "zs.json").read_text())
    top1 = np.mean([r[0] == row["label"] for r, row in zip(ranked, rows)])
    assert result["metrics"]["top1"] == pytest.approx(top1)
    for c in result["tables"]["per_class"]:  # the CLI's per-class recall from the pipeline's predictions
        mine = [r[0] == c["class"] for r, row in zip(ranked, rows) if row["label"] == c["class"]]
        assert c["recall"] == pytest.approx(np.mean(mine))


def test_export_writes_complete_tokenizer_and_preprocessor(exported):
    root, _ = exported
    names = {p.name for p in (root / "hf").iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"} <= names
    config = json.loads((root / "hf" / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == 16  # the model's context, so truncation=True cuts where clipkit does


def test_missing_tokenizer_files_are_what_the_ranking_test_catches(exported, tmp_path):
    """The negative control: the same export without its tokenizer files scores every label alike."""
    import shutil

    root, rows = exported
    broken = tmp_path / "hf"
    shutil.copytree(root / "hf", broken)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (broken / name).unlink()
    _, scores = _pipeline_rankings(broken, rows[:2])
    assert all(s == pytest.approx([1 / len(LABELS)] * len(LABELS)) for s in scores)
    with pytest.raises(AssertionError):
        assert_real_scores(scores)


def test_export_refuses_a_tokenizer_that_would_not_load(exported, tmp_path, monkeypatch):
    """If the tokenizer writes nothing (or something transformers reads differently), `save_hf` raises and
    leaves no directory behind, instead of an export that scores every label the same."""
    from clipkit.model.tokenizer import Tokenizer

    root, _ = exported
    model, _, tok = clipkit.load(root / "ck")
    monkeypatch.setattr(Tokenizer, "save", lambda self, directory: None)
    with pytest.raises(CheckpointError, match="tokeniz"):
        clipkit.save_hf(model, tok, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert main(["convert", str(root / "ck"), "--to", "hf", "--out", str(tmp_path / "cli")]) == 2
    assert not (tmp_path / "cli").exists()
