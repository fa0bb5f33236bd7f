"""clipkit.evaluate.fewshot: linear probe, zero-shot-anchored blend, Tip-Adapter and the few-shot curve on synthetic clusters."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from clipkit.evaluate.fewshot import (
    BLEND_L2_GRID,
    METHODS,
    PROBE_L2_GRID,
    TIP_DEFAULT,
    accuracy,
    few_shot_curve,
    fit_blend,
    fit_linear_probe,
    fit_tip_adapter,
    sample_shots,
    stratified_split,
    summarise_few_shot,
    target_ranks,
)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def clusters(C=8, D=32, n_train=20, n_test=30, noise=2.0, zs_noise=1.5, seed=0):
    """Unit embeddings around C class centres, and zero-shot weights = centres plus noise (an imperfect text tower)."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.normal(size=(C, D)))

    def draw(n):
        y = np.repeat(np.arange(C), n)
        return _unit(centres[y] + noise * rng.normal(size=(len(y), D)) / np.sqrt(D)), y

    (train_X, train_y), (test_X, test_y) = draw(n_train), draw(n_test)
    return train_X, train_y, test_X, test_y, _unit(centres + zs_noise * rng.normal(size=(C, D)) / np.sqrt(D))


def test_target_ranks_pessimistic():
    s = np.array([[3, 1, 2], [1, 1, 1], [np.nan, 0, 0]])
    assert target_ranks(s, np.array([0, 1, 0])).tolist() == [1, 3, 3]
    assert accuracy(s, np.array([0, 1, 0])) == pytest.approx(1 / 3)


def test_linear_probe_separable_and_records_l2():
    rng = np.random.default_rng(0)
    centres = np.eye(3, 8, dtype=np.float32) * 3
    y = np.repeat(np.arange(3), 20)
    X = _unit(centres[y] + 0.3 * rng.normal(size=(60, 8)))
    probe = fit_linear_probe(X, y, 3)
    assert accuracy(probe.predict_scores(X), y) == 1.0
    assert probe.l2 in PROBE_L2_GRID and set(probe.val_top1) == set(PROBE_L2_GRID)
    assert probe.val_top1[probe.l2] == max(probe.val_top1.values())
    assert probe.weight.shape == (3, 8) and probe.bias.shape == (3,)
    one = fit_linear_probe(X[[0, 20, 40]], y[[0, 20, 40]], 3)  # nothing to hold out -> strongest L2
    assert one.l2 == max(PROBE_L2_GRID) and one.val_top1 == {}


def test_probe_keeps_thread_count():
    before = torch.get_num_threads()
    fit_linear_probe(np.eye(4, dtype=np.float32), np.arange(4) % 2, 2)
    assert torch.get_num_threads() == before


def test_stratified_split_holds_out_per_class():
    y = np.array([0] * 10 + [1] * 2 + [2])
    tr, va = stratified_split(y, 0.2, seed=0)
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(13))
    assert np.bincount(y[va], minlength=3).tolist() == [2, 1, 0]


def test_sample_shots_nested_and_short_classes():
    y = np.array([0] * 10 + [1] * 3)
    k2, k8 = sample_shots(y, 2, 2, seed=1), sample_shots(y, 8, 2, seed=1)
    assert set(k2) <= set(k8) and len(k2) == 4 and len(k8) == 8 + 3


def test_blend_starts_at_zero_shot():
    train_X, train_y, test_X, test_y, zs = clusters()
    idx = sample_shots(train_y, 1, 8, seed=0)  # one shot: strongest pull, ~zero-shot
    blend = fit_blend(train_X[idx], train_y[idx], zs)
    assert blend.l2 == max(BLEND_L2_GRID)
    assert accuracy(blend.predict_scores(test_X), test_y) == pytest.approx(accuracy(test_X @ zs.T, test_y), abs=0.03)


def test_tip_adapter_default_then_selected():
    train_X, train_y, test_X, test_y, zs = clusters()
    one = fit_tip_adapter(train_X[sample_shots(train_y, 1, 8, 0)], train_y[sample_shots(train_y, 1, 8, 0)], zs)
    assert (one.alpha, one.beta) == TIP_DEFAULT
    idx = sample_shots(train_y, 16, 8, 0)
    tip = fit_tip_adapter(train_X[idx], train_y[idx], zs)
    assert accuracy(tip.predict_scores(test_X), test_y) > accuracy(test_X @ zs.T, test_y)


def test_few_shot_curve_on_clusters():
    train_X, train_y, test_X, test_y, zs = clusters()
    df = few_shot_curve(train_X, train_y, test_X, test_y, zs, shots=(1, 4, 16), seeds=(0, 1))
    assert list(df.columns) == ["k", "seed", "method", "top1", "n_train"]
    assert len(df) == 3 * 2 * len(METHODS) and set(df["method"]) == set(METHODS)
    s = summarise_few_shot(df).set_index(["k", "method"])
    assert list(s.columns) == ["mean", "std", "seeds"]
    zs_acc = accuracy(test_X @ zs.T, test_y)
    assert (df.loc[df.method == "zero_shot", "top1"] == zs_acc).all()
    assert s.loc[(16, "probe"), "mean"] > s.loc[(4, "probe"), "mean"] > s.loc[(1, "probe"), "mean"]
    assert s.loc[(16, "blend"), "mean"] >= zs_acc - 0.02
    assert s.loc[(16, "probe"), "mean"] > zs_acc + 0.1


def test_few_shot_uses_what_short_classes_have():
    train_X, train_y, test_X, test_y, zs = clusters(n_train=6)
    keep = np.flatnonzero((train_y != 2) | (np.arange(len(train_y)) % 6 < 3))  # class 2 has 3 images
    df = few_shot_curve(train_X[keep], train_y[keep], test_X, test_y, zs, shots=(4,), seeds=(0,), methods=("probe",))
    assert df["n_train"].tolist() == [7 * 4 + 3]


def test_summarise_single_seed_std_zero():
    df = few_shot_curve(*clusters(C=3, D=8, n_train=4, n_test=4), shots=(2,), seeds=(0,), methods=("zero_shot",))
    assert summarise_few_shot(df)["std"].tolist() == [0.0]
    with pytest.raises(ValueError, match="unknown"):
        few_shot_curve(*clusters(C=3, D=8, n_train=4, n_test=4), shots=(2,), seeds=(0,), methods=("svm",))
