"""Tests for clipkit.evaluate.scoring: hand-computed CLIPScore/RefCLIPScore, row alignment with a corrupt image,
R-precision on constructed embeddings, reranking, contact sheet and bootstrap CI."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw

from clipkit.formats import save
from clipkit.embed import Embedder
from clipkit.errors import ImageLoadError
from clipkit.model.factory import create_model_and_tokenizer
from clipkit.report.plots import LABEL_H, PAD, TILE_BG, TITLE_H, contact_sheet
from clipkit.evaluate.scoring import (
    REFERENCE_PREFIX,
    RankedImage,
    _draw_distractors,
    bootstrap_ci,
    clip_score,
    r_precision,
    r_precision_from_embeddings,
    ranking_json,
    ref_clip_score,
    rerank,
    rerank_table,
    summarise_scores,
)

PROMPTS = ["a red square", "a green circle", "a blue triangle", "a yellow square", "a purple circle", "a white square"]
COLOURS = [(220, 30, 30), (30, 200, 40), (30, 40, 220), (230, 220, 20), (150, 30, 160), (250, 250, 250)]


def _shape(path: Path, colour: tuple[int, int, int], kind: int, size: tuple[int, int] = (64, 64)) -> Path:
    img = Image.new("RGB", size, (20, 20, 20))
    d = ImageDraw.Draw(img)
    box = (size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4)
    [d.rectangle, d.ellipse, lambda b, fill: d.polygon([(b[0], b[3]), (b[2], b[3]), ((b[0] + b[2]) // 2, b[1])], fill=fill)][kind % 3](box, fill=colour)
    img.save(path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    d = tmp_path_factory.mktemp("imgs")
    good = [_shape(d / f"{i}.png", c, i, (64 + 16 * i, 64)) for i, c in enumerate(COLOURS)]
    corrupt = d / "corrupt.png"
    corrupt.write_bytes(good[0].read_bytes()[:60])  # truncated PNG: header parses, decode fails
    rgba = Image.new("RGBA", (1024, 256), (255, 0, 0, 0))  # transparent padding around an opaque band
    ImageDraw.Draw(rgba).rectangle((384, 64, 640, 192), fill=(0, 120, 255, 255))
    rgba.save(d / "wide.png")
    return {"good": good, "corrupt": corrupt, "wide": d / "wide.png"}


@pytest.fixture(scope="module")
def embedder(tmp_path_factory: pytest.TempPathFactory) -> Embedder:
    model, tok = create_model_and_tokenizer("tiny")
    directory = save(model, tok, tmp_path_factory.mktemp("model") / "tiny")
    return Embedder(directory, device="cpu", progress=False)


class StubEmbedder:
    """Embedder-like: texts and images map to given vectors (normalised); unknown images fail."""

    def __init__(self, texts: dict[str, np.ndarray], images: dict[str, np.ndarray] | None = None) -> None:
        unit = lambda v: np.asarray(v, np.float32) / np.linalg.norm(v)  # noqa: E731
        self.t = {k: unit(v) for k, v in texts.items()}
        self.i = {k: unit(v) for k, v in (images or {}).items()}
        self.seen: list[list[str]] = []
        self.failures: list[tuple[int, ImageLoadError]] = []

    def texts(self, strings: list[str]) -> np.ndarray:
        self.seen.append(list(strings))
        return np.stack([self.t[s] for s in strings])

    def images(self, items: list, on_error: str = "raise") -> np.ndarray:
        dim = len(next(iter(self.t.values())))
        self.failures = [(k, ImageLoadError(str(x), "missing")) for k, x in enumerate(items) if x not in self.i]
        return np.stack([self.i.get(x, np.full(dim, np.nan, np.float32)) for x in items])


def _hand_clip_s(img: np.ndarray, txt: np.ndarray) -> np.ndarray:
    return 2.5 * np.maximum(np.sum(img * txt, axis=1), 0)


# --- CLIPScore ---------------------------------------------------------------------------------------


def test_clip_score_matches_hand_computation(embedder: Embedder, files: dict) -> None:
    imgs = files["good"]
    got = clip_score(embedder, PROMPTS, imgs)
    want = _hand_clip_s(embedder.images(imgs), embedder.texts(PROMPTS))
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert got.shape == (len(PROMPTS),) and got.dtype == np.float32


def test_prefix_changes_the_text_embedding_used(embedder: Embedder, files: dict) -> None:
    imgs = files["good"]
    got = clip_score(embedder, PROMPTS, imgs, prefix=REFERENCE_PREFIX)
    want = _hand_clip_s(embedder.images(imgs), embedder.texts(["A photo depicts " + p for p in PROMPTS]))
    np.testing.assert_allclose(got, want, atol=1e-6)
    stub = StubEmbedder({"A photo depicts a cat": [1, 0], "a cat": [0, 1]}, {"x": [1, 0]})
    assert clip_score(stub, ["a cat"], ["x"], prefix="A photo depicts")[0] == pytest.approx(2.5)  # space added
    assert stub.seen == [["A photo depicts a cat"]]
    assert clip_score(stub, ["a cat"], ["x"])[0] == pytest.approx(0.0)


def test_clip_score_clamps_negative_cosine_per_pair() -> None:
    stub = StubEmbedder({"a": [1, 0], "b": [-1, 1]}, {"x": [1, 0]})
    np.testing.assert_allclose(clip_score(stub, ["a", "b"], ["x", "x"], w=2.0), [2.0, 0.0], atol=1e-6)


def test_corrupt_image_gives_nan_in_its_own_row_and_nothing_shifts(embedder: Embedder, files: dict) -> None:
    good = files["good"][:5]
    imgs = good[:2] + [files["corrupt"]] + good[2:]
    prompts = PROMPTS[:2] + ["the corrupt one"] + PROMPTS[2:5]
    got = clip_score(embedder, prompts, imgs)
    assert np.isnan(got[2]) and np.isfinite(np.delete(got, 2)).all()
    np.testing.assert_allclose(np.delete(got, 2), clip_score(embedder, PROMPTS[:5], good), atol=1e-6)
    summary = summarise_scores(got)
    assert summary["n"] == 5 and summary["n_failed"] == 1
    assert summary["clipscore_mean"] == pytest.approx(float(np.nanmean(got)))
    with pytest.raises(ImageLoadError):
        clip_score(embedder, prompts, imgs, on_error="raise")


def test_bad_pairs_are_rejected() -> None:
    stub = StubEmbedder({"a": [1, 0]}, {"x": [1, 0]})
    with pytest.raises(ValueError, match="align"):
        clip_score(stub, ["a"], ["x", "x"])
    with pytest.raises(ValueError, match="row 1"):
        clip_score(stub, ["a", float("nan")], ["x", "x"])


def test_ref_clip_score_equals_hand_formula(embedder: Embedder, files: dict) -> None:
    imgs, refs = files["good"][:3], [["a red box", "red"], ["a green ball"], ["blue", "a triangle", "shape"]]
    got = ref_clip_score(embedder, PROMPTS[:3], imgs, refs)
    clip_s = _hand_clip_s(embedder.images(imgs), embedder.texts(PROMPTS[:3]))
    cand = embedder.texts(PROMPTS[:3])
    ref_s = np.array([max(0.0, float((embedder.texts(r) @ c).max())) for c, r in zip(cand, refs)])
    np.testing.assert_allclose(got, 2 * clip_s * ref_s / (clip_s + ref_s), atol=1e-6)


def test_ref_clip_score_zero_and_failed_rows() -> None:
    stub = StubEmbedder({"c": [1, 0], "r": [-1, 0], "s": [1, 0]}, {"x": [1, 0]})
    got = ref_clip_score(stub, ["c", "c", "c"], ["x", "x", "missing"], [["r"], ["r", "s"], ["s"]])
    # row 0: refs all negative -> 0; row 1: H(2.5, 1) = 5/3.5; row 2: failed image stays NaN
    np.testing.assert_allclose(got[:2], [0.0, 5 / 3.5], atol=1e-6)
    assert np.isnan(got[2])
    with pytest.raises(ValueError, match="row 0"):
        ref_clip_score(stub, ["c"], ["x"], [[]])


# --- bootstrap ---------------------------------------------------------------------------------------


def test_bootstrap_ci_contains_mean_and_is_deterministic() -> None:
    v = np.random.default_rng(1).normal(0.7, 0.1, 200)
    v[::17] = np.nan
    low, high = bootstrap_ci(v, seed=3)
    assert low < np.nanmean(v) < high and high - low < 0.1
    assert bootstrap_ci(v, seed=3) == (low, high)
    assert bootstrap_ci(v, seed=4) != (low, high)
    assert all(math.isnan(x) for x in bootstrap_ci([np.nan]))
    assert summarise_scores([np.nan])["clipscore_mean"] is None


# --- R-precision -------------------------------------------------------------------------------------


def test_r_precision_from_embeddings_exact() -> None:
    prompts = np.eye(4, dtype=np.float32)
    s = np.float32(1 / math.sqrt(2))
    img = np.stack([prompts[0], prompts[2], np.array([s, 0, s, 0], np.float32), np.full(4, np.nan, np.float32)])
    # R=4 draws every other prompt: row 0 hit, row 1 miss, row 2 tie (pessimistic: miss), row 3 failed
    out = r_precision_from_embeddings(img, prompts, [0, 1, 2, 3], R=4, seed=0)
    assert out == {"r_precision": pytest.approx(1 / 3), "R": 4, "chance_r_precision": 0.25, "n": 3, "n_failed": 1}


def test_distractors_are_distinct_other_prompts_and_seeded() -> None:
    ids = np.array([0, 5, 9, 9, 3] * 20)
    d = _draw_distractors(ids, 10, 6, np.random.default_rng(7))
    assert d.shape == (100, 6) and d.min() >= 0 and d.max() <= 9
    assert all(own not in row and len(set(row)) == 6 for own, row in zip(ids, d))
    assert (d == _draw_distractors(ids, 10, 6, np.random.default_rng(7))).all()
    assert {int(x) for x in d.ravel()} == set(range(10))  # every prompt gets drawn somewhere


def test_r_precision_is_chance_for_random_and_high_for_aligned_embeddings() -> None:
    rng = np.random.default_rng(0)
    prompts = rng.normal(size=(50, 16)).astype(np.float32)
    ids = rng.integers(0, 50, 4000)
    rand = r_precision_from_embeddings(rng.normal(size=(4000, 16)).astype(np.float32), prompts, ids, R=10)
    assert abs(rand["r_precision"] - 0.1) < 0.02  # std of the estimate is 0.005
    aligned = prompts[ids] + 0.3 * rng.normal(size=(4000, 16)).astype(np.float32)
    assert r_precision_from_embeddings(aligned, prompts, ids, R=10)["r_precision"] > 0.9


def test_r_precision_api_with_aligned_stub_and_real_model(embedder: Embedder, files: dict) -> None:
    rng = np.random.default_rng(0)
    texts = {p: rng.normal(size=8) for p in PROMPTS}
    stub = StubEmbedder(texts, {f"img{i}": texts[p] + 0.1 * rng.normal(size=8) for i, p in enumerate(PROMPTS)})
    out = r_precision(stub, PROMPTS + ["a red square"], [f"img{i}" for i in range(6)] + ["gone"], R=4)
    assert out["r_precision"] == 1.0 and out["chance_r_precision"] == 0.25 and out["n"] == 6 and out["n_failed"] == 1
    assert stub.seen == [PROMPTS]  # distinct prompts embedded once
    imgs = files["good"] + [files["corrupt"]]
    real = r_precision(embedder, PROMPTS + ["x"], imgs, num_distractors=3, seed=1)
    assert real["R"] == 4 and real["n"] == 6 and real["n_failed"] == 1 and 0 <= real["r_precision"] <= 1
    with pytest.raises(ValueError, match="distinct prompts"):
        r_precision(stub, PROMPTS, [f"img{i}" for i in range(6)], R=7)


# --- reranking ---------------------------------------------------------------------------------------


def _scores_by_image(ranked: list[RankedImage]) -> dict[object, float]:
    return {r.image: r.score for r in ranked}


def test_rerank_orders_by_descending_similarity(embedder: Embedder, files: dict) -> None:
    imgs = files["good"]
    ranked = rerank(embedder, "a red square", imgs)
    want = embedder.images(imgs) @ embedder.texts(["a red square"])[0]
    assert [r.rank for r in ranked] == list(range(1, 7))
    assert all(a.score >= b.score for a, b in zip(ranked, ranked[1:]))
    got = _scores_by_image(ranked)
    np.testing.assert_allclose([got[p] for p in imgs], want, atol=1e-5)
    assert rerank(embedder, "a red square", imgs, top=2) == ranked[:2]


def test_rerank_negative_prompt_and_templates(embedder: Embedder, files: dict) -> None:
    imgs = files["good"][:4]
    img = embedder.images(imgs)
    p, n = embedder.texts(["a red square", "blurry"])
    got = _scores_by_image(rerank(embedder, "a red square", imgs, negative_prompt="blurry", negative_weight=0.5))
    np.testing.assert_allclose([got[x] for x in imgs], img @ p - 0.5 * (img @ n), atol=1e-5)
    templates = ["{}", "a picture of {}"]
    q = embedder.texts(["a red square", "a picture of a red square"]).mean(axis=0)
    got = _scores_by_image(rerank(embedder, "a red square", imgs, templates=templates))
    np.testing.assert_allclose([got[x] for x in imgs], img @ (q / np.linalg.norm(q)), atol=1e-5)


def test_rerank_ties_are_stable_and_failures_go_last() -> None:
    stub = StubEmbedder({"p": [1, 0]}, {"a": [1, 1], "b": [1, 0], "c": [1, 1]})
    ranked = rerank(stub, "p", ["a", "bad", "b", "c"])
    assert [r.image for r in ranked] == ["b", "a", "c", "bad"]
    assert math.isnan(ranked[-1].score) and "missing" in ranked[-1].error and ranked[-1].rank == 4
    doc = ranking_json("p", ranked)
    json.dumps(doc, allow_nan=False)
    assert doc["prompt"] == "p" and [x["image"] for x in doc["ranking"]] == ["b", "a", "c", "bad"]
    assert doc["ranking"][0]["score"] == pytest.approx(1.0) and doc["ranking"][-1]["score"] is None


def test_rerank_table_groups_by_prompt_and_matches_rerank(embedder: Embedder, files: dict) -> None:
    imgs = files["good"] + [files["corrupt"]]
    table = pd.DataFrame({"prompt": ["a red square", "a blue triangle"] * 3 + ["a blue triangle"], "image": imgs})
    out = rerank_table(embedder, table, negative_prompt="dark", templates=["{}", "art of {}"])
    assert list(out) == ["a red square", "a blue triangle"]
    for prompt, ranked in out.items():
        alone = rerank(embedder, prompt, table.image[table.prompt == prompt].tolist(), negative_prompt="dark", templates=["{}", "art of {}"])
        assert [r.image for r in ranked] == [r.image for r in alone]
        np.testing.assert_allclose([r.score for r in ranked], [r.score for r in alone], atol=1e-5)
    assert out["a blue triangle"][-1].image == files["corrupt"] and out["a blue triangle"][-1].error
    with pytest.raises(ValueError, match="available"):
        rerank_table(embedder, table, prompt_column="caption")


# --- contact sheet -----------------------------------------------------------------------------------


@pytest.mark.parametrize("n,cols,grid", [(5, 4, (4, 2)), (3, 4, (3, 1))])
def test_contact_sheet_is_a_png_of_the_expected_size(files: dict, tmp_path: Path, n: int, cols: int, grid: tuple[int, int]) -> None:
    items = [files["wide"], files["corrupt"], *files["good"]][:n]
    ranked = [RankedImage(x, 0.3 - 0.01 * k if k != 1 else math.nan, k + 1) for k, x in enumerate(items)]
    out = contact_sheet(ranked, tmp_path / "sheet.png", prompt="a very long prompt " * 20, tile=96, cols=cols)
    with Image.open(out) as sheet:
        assert sheet.format == "PNG"
        assert sheet.size == (PAD + grid[0] * (96 + PAD), TITLE_H + grid[1] * (96 + LABEL_H + PAD) + PAD)
        rgb = sheet.convert("RGB")
        # the wide RGBA candidate is letterboxed: its opaque blue centre shows, its transparent rim does not
        assert rgb.getpixel((PAD + 48, TITLE_H + 48)) == pytest.approx((0, 120, 255), abs=10)
        assert rgb.getpixel((PAD + 5, TITLE_H + 48)) == TILE_BG  # hidden red under alpha 0 never leaks
    assert [p.name for p in tmp_path.iterdir()] == ["sheet.png"]  # no temp file left behind


# --- table runners behind `clipkit score` / `clipkit rerank` ------------------------------------------


def _pairs_csv(tmp_path: Path, files: dict) -> Path:
    good = files["good"]
    rows = [("a red square", good[0], "a red box|a scarlet square"), ("a red square", good[1], '["a red box"]'),
            ("a blue circle", good[2], "a blue ball"), ("a blue circle", files["corrupt"], "a blue ball")]
    text = "prompt,image,refs\n" + "".join(f'{p},{i},"{r.replace(chr(34), chr(34) * 2)}"\n' for p, i, r in rows)
    (tmp_path / "pairs.csv").write_text(text)
    return tmp_path / "pairs.csv"


def test_score_table_with_references_matches_the_api(embedder: Embedder, files: dict, tmp_path: Path) -> None:
    from clipkit.evaluate.runners import score_table

    out = tmp_path / "scores.json"
    summary = score_table(embedder, _pairs_csv(tmp_path, files), reference_column="refs", json_out=out)
    images = [str(p) for p in (*files["good"][:3], files["corrupt"])]
    prompts = ["a red square", "a red square", "a blue circle", "a blue circle"]
    want = ref_clip_score(embedder, prompts, images, [["a red box", "a scarlet square"], ["a red box"], ["a blue ball"], ["a blue ball"]])
    rows = json.loads(out.read_text())["pairs"]
    assert [r["refclipscore"] for r in rows[:3]] == pytest.approx(want[:3].tolist(), abs=1e-6)
    assert rows[3]["clipscore"] is None and rows[3]["refclipscore"] is None  # the corrupt image, in its own row
    assert summary["n_failed"] == 1 and summary["refclipscore_mean"] == pytest.approx(float(np.nanmean(want)), abs=1e-6)


def test_score_table_r_precision_keys_sit_beside_their_chance(embedder: Embedder, files: dict, tmp_path: Path) -> None:
    from clipkit.evaluate.runners import score_table

    summary = score_table(embedder, _pairs_csv(tmp_path, files), r_precision_r=2)
    assert summary["chance_r_precision"] == 0.5 and summary["r_precision_R"] == 2
    assert (summary["r_precision_n"], summary["r_precision_n_failed"]) == (3, 1)
    assert 0 <= summary["r_precision"] <= 1 and not any(k.endswith("_chance") for k in summary)


def test_rerank_pairs_ranks_each_prompt_and_writes_sheets(embedder: Embedder, files: dict, tmp_path: Path) -> None:
    from clipkit.evaluate.runners import rerank_pairs

    results = rerank_pairs(embedder, _pairs_csv(tmp_path, files), sheet_dir=tmp_path / "sheets", json_out=tmp_path / "r.json")
    assert [r["prompt"] for r in results] == ["a red square", "a blue circle"]
    assert [len(r["ranking"]) for r in results] == [2, 2]
    assert results[1]["ranking"][-1]["score"] is None  # the corrupt candidate is ranked last
    assert sorted(p.name for p in (tmp_path / "sheets").iterdir()) == ["prompt0000.png", "prompt0001.png"]
    assert json.loads((tmp_path / "r.json").read_text()) == results


def test_resize_mode_override_letterboxes(embedder: Embedder, files: dict) -> None:
    from clipkit.embed import as_embedder

    boxed = as_embedder(embedder, resize_mode="longest")
    assert boxed.preprocess.cfg.resize_mode == "longest" and embedder.preprocess.cfg.resize_mode == "shortest"
    wide = str(files["wide"])
    assert not np.allclose(boxed.images([wide]), embedder.images([wide]))
