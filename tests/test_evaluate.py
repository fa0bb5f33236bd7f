"""clipkit.evaluate and clipkit.report.plots: hand-computed metrics, pessimistic ties, runners end to end, PNG output."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from helpers import random_image

from clipkit.embed import Embedder
from clipkit.errors import DataError
from clipkit.evaluate.metrics import classification_metrics, per_class_table, retrieval_chance, retrieval_metrics
from clipkit.evaluate.runners import dedupe_images, eval_linear_probe, eval_retrieval, eval_zeroshot, write_json
from clipkit.evaluate.zeroshot import DEFAULT_TEMPLATES, load_templates, zero_shot_weights
from clipkit.evaluate.fewshot import summarise_few_shot
from clipkit.report.plots import plot_few_shot, plot_loss_curve, plot_retrieval_grid

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _scores_as_embeddings(S: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(image_emb, text_emb) whose text->image similarity matrix is exactly S [Nt, Ni]."""
    return np.eye(S.shape[1], dtype=np.float32), np.asarray(S, np.float32)


def _ranked(nt: int, rank_of: list[int]) -> np.ndarray:
    """Scores [Nt, Ni] where text t's own image (t) sits at 1-based rank rank_of[t], all scores distinct."""
    S = np.zeros((nt, nt), np.float32)
    for t in range(nt):
        order = [j for j in range(nt) if j != t]
        order.insert(rank_of[t] - 1, t)
        S[t, order] = np.arange(nt, 0, -1)
    return S


# --- retrieval -------------------------------------------------------------------------------------


def test_perfect_ranking():
    m = retrieval_metrics(np.eye(4, dtype=np.float32), np.eye(4, dtype=np.float32), np.arange(4))
    for d in ("text_to_image", "image_to_text"):
        assert m[f"{d}_R@1"] == m[f"{d}_R@5"] == m[f"{d}_R@10"] == 1.0
        assert m[f"{d}_median_rank"] == 1.0
    assert m["num_images"] == m["num_texts"] == 4
    assert m["chance_text_to_image_R@1"] == 0.25 and m["chance_text_to_image_R@5"] == 1.0


def test_graded_and_reversed_ranking():
    n = 12
    m = retrieval_metrics(*_scores_as_embeddings(_ranked(n, list(range(1, n + 1)))), np.arange(n))
    assert m["text_to_image_R@1"] == pytest.approx(1 / 12)
    assert m["text_to_image_R@5"] == pytest.approx(5 / 12)
    assert m["text_to_image_R@10"] == pytest.approx(10 / 12)
    assert m["text_to_image_median_rank"] == 6.5
    m = retrieval_metrics(*_scores_as_embeddings(_ranked(n, [n] * n)), np.arange(n))  # right one always last
    assert m["text_to_image_R@10"] == 0.0 and m["text_to_image_median_rank"] == n


def test_constant_and_nan_scores_rank_last():
    img, txt = np.ones((5, 3), np.float32), np.ones((5, 3), np.float32)
    m = retrieval_metrics(img, txt, np.arange(5))
    assert m["text_to_image_R@1"] == m["image_to_text_R@1"] == 0.0  # ties go to the wrong items
    assert m["text_to_image_median_rank"] == m["image_to_text_median_rank"] == 5
    assert m["text_to_image_R@1"] <= m["chance_text_to_image_R@1"]
    txt[2] = np.nan
    m = retrieval_metrics(np.eye(5, 3, dtype=np.float32), txt, np.arange(5))
    assert m["text_to_image_median_rank"] == 5


def test_several_captions_per_image_and_ties():
    S = np.array([  # texts x images; captions 0,1 -> image 0; 2 -> image 1; 3,4 -> image 2
        [0.9, 0.1, 0.0],
        [0.2, 0.8, 0.3],
        [0.1, 0.7, 0.5],
        [0.0, 0.9, 0.3],
        [0.5, 0.4, 0.3],
    ])
    m = retrieval_metrics(*_scores_as_embeddings(S), np.array([0, 0, 1, 2, 2]), ks=(1, 2, 5))
    # t2i ranks per caption: 1, 3, 1, 2, 3
    assert m["text_to_image_R@1"] == pytest.approx(2 / 5)
    assert m["text_to_image_R@2"] == pytest.approx(3 / 5)
    assert m["text_to_image_median_rank"] == 2
    # i2t best caption rank: image 0 -> 1 (0.9); image 1 -> 3 (0.8, 0.9 above its 0.7);
    # image 2 -> 3 (its best is 0.3; 0.5 above and caption 1's 0.3 is a tie with a wrong item)
    assert m["image_to_text_R@1"] == pytest.approx(1 / 3)
    assert m["image_to_text_R@2"] == pytest.approx(1 / 3)
    assert m["image_to_text_R@5"] == 1.0
    assert m["image_to_text_median_rank"] == 3


def test_retrieval_chance_hand_values():
    c = retrieval_chance(3, np.array([0, 0, 1, 2, 2]), ks=(1, 2, 5))
    assert c["text_to_image_R@1"] == pytest.approx(1 / 3)
    # image with m=2 of 5 captions: P(any in top 1) = 2/5, top 2 = 1 - C(3,2)/C(5,2) = 0.7; m=1: 1/5, 2/5
    assert c["image_to_text_R@1"] == pytest.approx((0.4 + 0.2 + 0.4) / 3)
    assert c["image_to_text_R@2"] == pytest.approx((0.7 + 0.4 + 0.7) / 3)
    assert c["image_to_text_R@5"] == 1.0
    assert c["text_to_image_median_rank"] == 2.0


def test_retrieval_chance_matches_random_rankings():
    rng = np.random.default_rng(0)
    t2i = np.array([0, 0, 0, 1, 2, 2, 3, 4, 5, 5])
    runs = [retrieval_metrics(np.eye(6, dtype=np.float32), rng.random((10, 6)).astype(np.float32), t2i) for _ in range(300)]
    for key in ("text_to_image_R@1", "image_to_text_R@1", "image_to_text_R@5"):
        assert np.mean([r[key] for r in runs]) == pytest.approx(runs[0][f"chance_{key}"], abs=0.03)


def test_dedupe_images():
    table = pd.DataFrame({"image": ["/a.png", "/b.png", "/a.png", "/c.png", "/b.png"], "caption": list("vwxyz")})
    paths, t2i = dedupe_images(table)
    assert paths == ["/a.png", "/b.png", "/c.png"]
    assert t2i.tolist() == [0, 1, 0, 2, 1]
    with pytest.raises(DataError):
        dedupe_images(pd.DataFrame({"image": ["/a.png", None]}))


def test_bad_retrieval_inputs():
    with pytest.raises(ValueError):
        retrieval_metrics(np.eye(2), np.eye(2), np.array([0, 2]))
    with pytest.raises(ValueError):
        retrieval_metrics(np.eye(2), np.eye(2), np.array([0]))


# --- zero-shot weights and templates ---------------------------------------------------------------


def test_zero_shot_weights_normalise_then_average():
    vecs = {"a cat": [2, 0, 0], "the cat": [0, 1, 0], "a dog": [0, 0, 3], "the dog": [0, 0, 1]}
    calls = []

    def fake_embed(texts):
        calls.append(list(texts))
        return np.array([vecs[t] for t in texts], np.float32)

    w = zero_shot_weights(fake_embed, ["cat", "dog"], ["a {}", "the {}"])
    assert calls == [["a cat", "the cat", "a dog", "the dog"]]  # one batched call, class-major
    np.testing.assert_allclose(w, [[2**-0.5, 2**-0.5, 0], [0, 0, 1]], atol=1e-6)  # not [1, .5, 0] normalised
    assert w.dtype == np.float32


def test_load_templates(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("# prompts\na photo of a {}.\n\n{} icon\n", encoding="utf-8")
    assert load_templates(p) == ("a photo of a {}.", "{} icon")
    p.write_text("a photo of a {}.\nno slot here\n", encoding="utf-8")
    with pytest.raises(DataError, match="no slot here"):
        load_templates(p)
    assert all("{}" in t for t in DEFAULT_TEMPLATES)


# --- classification --------------------------------------------------------------------------------


def _imbalanced_case() -> tuple[np.ndarray, np.ndarray]:
    """Classes 0 (4 samples), 1 (2), 2 (1) of 6; top-1 right for 3 + 1 + 0."""
    S = np.array([
        [5, 1, 0, 0, 0, 0],
        [5, 1, 0, 0, 0, 0],
        [5, 1, 0, 0, 0, 0],
        [1, 5, 0, 0, 0, 0],  # class 0 taken for 1
        [1, 1, 0, 0, 0, 0],  # class 1 tied with 0: counted wrong
        [0, 2, 1, 0, 0, 0],
        [5, 4, 0, 3, 2, 1],  # class 2 ranked last: a top-5 miss
    ], np.float32)
    return S, np.array([0, 0, 0, 0, 1, 1, 2])


def test_classification_metrics_imbalanced():
    m = classification_metrics(*_imbalanced_case())
    assert m["top1"] == pytest.approx(4 / 7)
    assert m["top5"] == pytest.approx(6 / 7)
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 1 / 2 + 0) / 3)
    assert (m["num_classes"], m["num_samples"]) == (6, 7)
    assert m["chance_top1"] == pytest.approx(1 / 6) and m["chance_top5"] == pytest.approx(5 / 6)
    assert m["majority_top1"] == pytest.approx(4 / 7)


def test_constant_classifier_scores_zero():
    m = classification_metrics(np.zeros((6, 3)), np.array([0, 0, 0, 0, 1, 2]))
    assert m["top1"] == 0.0 < m["chance_top1"] and m["balanced_accuracy"] == 0.0


def test_per_class_table():
    S, y = _imbalanced_case()
    t = per_class_table(S, y, ["a", "b", "c", "d", "e", "f"])
    assert list(t.columns) == ["class", "n", "recall", "most_confused_with", "confused_rate"]
    assert t["n"].tolist() == [4, 2, 1, 0, 0, 0]
    assert t["recall"].iloc[:3].tolist() == pytest.approx([0.75, 0.5, 0.0])
    assert t["most_confused_with"].iloc[:3].tolist() == ["b", "a", "a"]
    assert t["confused_rate"].iloc[:3].tolist() == pytest.approx([0.25, 0.5, 1.0])
    assert math.isnan(t["recall"].iloc[3])


# --- runners end to end ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedder(saved_tiny_dir) -> Embedder:
    return Embedder(saved_tiny_dir, device="cpu", progress=False)


@pytest.fixture(scope="module")
def labelled_table(tmp_path_factory) -> pd.DataFrame:
    """18 random PNGs in 3 classes plus one corrupt file (class 'cat')."""
    d = tmp_path_factory.mktemp("eval_images")
    rows = []
    for i in range(18):
        label = ("cat", "dog", "fish")[i % 3]
        path = d / f"{i}.png"
        random_image(100 + i, (40, 40)).save(path)
        rows.append({"image": str(path), "caption": f"a {label} number {i}", "label": label})
    bad = d / "corrupt.png"
    bad.write_bytes(PNG_MAGIC + b"not really a png")
    rows.append({"image": str(bad), "caption": "a broken cat", "label": "cat"})
    return pd.DataFrame(rows)


def test_eval_zeroshot_random_model(embedder, labelled_table, tmp_path):
    r = eval_zeroshot(embedder, labelled_table)
    m = r.metrics
    assert m["skipped_images"] == 1 and m["num_samples"] == 18 and m["num_classes"] == 3
    assert m["chance_top1"] == pytest.approx(1 / 3)
    assert abs(m["top1"] - 1 / 3) <= 0.3  # a random model is near chance
    assert r.tables["per_class"]["class"].tolist() == ["cat", "dog", "fish"]
    md = r.table()
    assert "| top1 |" in md and "0.3333" in md and "majority class" in md
    write_json(r, tmp_path / "zs.json")
    data = json.loads((tmp_path / "zs.json").read_text())
    assert data["metrics"]["skipped_images"] == 1 and len(data["tables"]["per_class"]) == 3


def test_eval_retrieval_random_model(embedder, labelled_table, tmp_path):
    extra = labelled_table.iloc[[0]].assign(caption="another caption of the first image")
    r = eval_retrieval(embedder, pd.concat([labelled_table, extra], ignore_index=True))
    m = r.metrics
    assert (m["num_images"], m["num_texts"], m["skipped_images"], m["skipped_texts"]) == (18, 19, 1, 1)
    assert m["text_to_image_R@10"] <= 1.0 and abs(m["text_to_image_R@5"] - m["chance_text_to_image_R@5"]) <= 0.35
    assert "chance" in r.table()
    out = tmp_path / "grid.png"
    plot_retrieval_grid(r.examples["queries"][:3], r.examples["results"][:3], out)
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_eval_linear_probe_random_model(embedder, labelled_table, tmp_path):
    train, test = labelled_table.iloc[list(range(12)) + [18]], labelled_table.iloc[12:18]
    r = eval_linear_probe(embedder, train, test, shots=(1, 2), seeds=(0,))
    m = r.metrics
    assert m["skipped_images"] == 1 and m["num_samples"] == 6 and m["num_train"] == 12
    assert m["probe_l2"] in (0, 1e-4, 1e-3, 1e-2, 1e-1)
    assert {"few_shot_probe_k2_top1", "few_shot_blend_k1_top1", "few_shot_tip_adapter_k2_top1"} <= set(m)
    assert m["chance_few_shot_probe_k2_top1"] == pytest.approx(1 / 3)
    assert set(r.tables["few_shot"]["method"]) == {"zero_shot", "probe", "blend", "tip_adapter"}
    write_json(r, tmp_path / "lp.json")
    assert json.loads((tmp_path / "lp.json").read_text())["task"] == "linear_probe"


def test_runner_input_errors(embedder, labelled_table):
    with pytest.raises(DataError, match="label"):
        eval_zeroshot(embedder, labelled_table.drop(columns="label"))
    with pytest.raises(DataError, match="could be loaded"):
        eval_zeroshot(embedder, labelled_table.iloc[[18]])


# --- plots -----------------------------------------------------------------------------------------


def _is_png(path: Path) -> bool:
    return path.stat().st_size > 0 and path.read_bytes()[:8] == PNG_MAGIC


def test_plots_write_png_atomically(tmp_path):
    img = tmp_path / "a.png"
    random_image(0).save(img)
    plot_retrieval_grid(["a red thing", "a missing file"], [[(str(img), 0.5), (str(img), 0.25)], [("/nope.png", 0.1)]],
                        tmp_path / "grid.png")
    df = pd.DataFrame([{"k": k, "seed": s, "method": m, "top1": 0.1 * k + 0.01 * s, "n_train": k}
                       for k in (1, 2, 4) for s in (0, 1) for m in ("zero_shot", "probe")])
    plot_few_shot(summarise_few_shot(df), tmp_path / "fs.png", chance=0.1)
    plot_loss_curve([0, 1, 2, 3], [2.0, 1.5, 1.2, 1.1], tmp_path / "loss.png", val=([1, 3], [1.6, 1.3]))
    assert all(_is_png(tmp_path / n) for n in ("grid.png", "fs.png", "loss.png"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "fs.png", "grid.png", "loss.png"]  # no temp files


def test_retrieval_with_several_images_per_text_hand_case():
    # texts: "cat" fits images 0 and 1, "dog" fits image 2; the cat query ranks image 1 first, dog ranks image 2 third
    img = np.eye(3, dtype=np.float32)
    txt = np.array([[0.1, 0.9, 0.2], [0.8, 0.5, 0.3]], np.float32)
    m = retrieval_metrics(img, txt, [np.array([0, 1]), np.array([2])])
    assert m["text_to_image_R@1"] == 0.5 and m["text_to_image_median_rank"] == 2.0  # ranks 1 and 3
    # image queries: 0 -> cat is its best text? scores cat 0.1 vs dog 0.8 -> rank 2; 1 -> cat rank 1; 2 -> dog 0.3 vs cat 0.2 -> rank 1
    assert m["image_to_text_R@1"] == pytest.approx(2 / 3)
    assert m["chance_text_to_image_R@1"] == pytest.approx((2 / 3 + 1 / 3) / 2)


class _TwinStyles:
    """Embedder stub: two art styles of one emoji share a caption; images sit near their caption."""

    def __init__(self) -> None:
        self.t = {"a cat": np.array([1, 0, 0], np.float32), "a dog": np.array([0, 1, 0], np.float32)}
        self.i = {"cat1.png": [1, 0.1, 0], "cat2.png": [1, 0, 0.1], "dog1.png": [0.1, 1, 0], "dog2.png": [0, 1, 0.1]}

    def images(self, items, on_error="raise"):
        self.failures = []
        return np.stack([np.asarray(self.i[p], np.float32) / np.linalg.norm(self.i[p]) for p in items])

    def texts(self, strings):
        return np.stack([self.t[s] for s in strings])


def test_identical_captions_of_different_images_are_not_wrong_answers():
    """Regression: with one text row per image, each image tied with its twin's identical caption and
    pessimistic ties made image->text R@1 exactly 0 for every image."""
    table = pd.DataFrame({"image": ["cat1.png", "cat2.png", "dog1.png", "dog2.png"],
                          "caption": ["a cat", "a cat", "a dog", "a dog"]})
    m = eval_retrieval(_TwinStyles(), table).metrics
    assert m["image_to_text_R@1"] == 1.0 and m["text_to_image_R@1"] == 1.0
    assert m["num_texts"] == 2 and m["duplicate_captions"] == 2


def _class_folder(root: Path, per_class: int = 3) -> Path:
    """A standard class-folder dataset: one sub-folder per class, images only, no caption files."""
    for c, label in enumerate(("cat", "dog")):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            random_image(10 * c + i, (32, 32)).save(root / label / f"{i}.png")
    random_image(99, (32, 32)).save(root / "loose.png")  # outside every class folder: unlabelled
    return root


def test_cli_zeroshot_and_linear_probe_on_an_uncaptioned_class_folder(saved_tiny_dir, tmp_path, capsys):
    """Regression: read_folder dropped every uncaptioned image, then zero-shot failed with "lacks column label"."""
    from clipkit.cli import main

    data = _class_folder(tmp_path / "classes")
    assert main(["eval", "zeroshot", "--model", str(saved_tiny_dir), "--data", str(data),
                 "--json", str(tmp_path / "zs.json")]) == 0, capsys.readouterr().err
    m = json.loads((tmp_path / "zs.json").read_text())["metrics"]
    assert (m["num_samples"], m["num_classes"], m["chance_top1"], m["unlabelled_rows"]) == (6, 2, 0.5, 1)
    assert main(["eval", "linear-probe", "--model", str(saved_tiny_dir), "--data", str(data), "--train", str(data),
                 "--json", str(tmp_path / "lp.json")]) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "lp.json").read_text())["metrics"]["num_train"] == 6
    assert main(["eval", "retrieval", "--model", str(saved_tiny_dir), "--data", str(data)]) == 2  # needs captions
    assert "caption" in capsys.readouterr().err


def test_run_eval_argument_errors_name_no_cli_flags(saved_tiny_dir, tmp_path, capsys):
    from clipkit.cli import main
    from clipkit.evaluate.runners import run_eval

    data = _class_folder(tmp_path / "classes")
    with pytest.raises(ValueError, match="train= table") as e:
        run_eval("linear-probe", saved_tiny_dir, data)
    assert "--" not in str(e.value)
    with pytest.raises(ValueError, match="no plot"):  # used to print "wrote PLOT" and write nothing
        run_eval("zeroshot", saved_tiny_dir, data, plot=tmp_path / "zs.png")
    assert main(["eval", "linear-probe", "--model", str(saved_tiny_dir), "--data", str(data)]) == 2
    assert "--train TABLE" in capsys.readouterr().err
