"""Classifiers on frozen embeddings: linear probe, zero-shot-anchored probe ("blend"), Tip-Adapter, few-shot curves.

Everything takes numpy arrays and returns scores `[N, C]`. Accuracy counts ties against the model
(`target_ranks`), so a constant or NaN classifier never scores above zero.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

PROBE_L2_GRID = (0.0, 1e-4, 1e-3, 1e-2, 1e-1)
BLEND_L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # penalty on W - anchor: 1.0 is ~zero-shot, 1e-4 ~a free probe
TIP_ALPHAS = (0.0, 0.1, 0.3, 1.0, 3.0)  # ascending: on equal leave-one-out accuracy the one nearest zero-shot wins
TIP_BETAS = (1.0, 3.0, 5.5, 10.0)
TIP_DEFAULT = (0.1, 5.5)  # (alpha, beta) when no class has two shots to leave one out
METHODS = ("zero_shot", "probe", "blend", "tip_adapter")
DEFAULT_SHOTS = (1, 2, 4, 8, 16)
DEFAULT_SEEDS = (0, 1, 2)


def finite_scores(scores: np.ndarray) -> np.ndarray:
    """float32 scores with NaN as -inf, so a NaN never ties with or beats a real score."""
    return np.nan_to_num(np.asarray(scores, np.float32), nan=-np.inf, posinf=np.inf, neginf=-np.inf)


def target_ranks(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """1-based rank of each row's target column among its scores `[N, C] -> [N]`.

    Ties count pessimistically: every other column scoring >= the target ranks above it, and NaN
    scores count as -inf, so a constant model ranks each target last instead of first.
    """
    s = finite_scores(scores)
    t = s[np.arange(len(s)), np.asarray(targets, np.int64)][:, None]  # [N, 1]
    return (s >= t).sum(1)  # the target itself is counted once -> 1-based


def accuracy(scores: np.ndarray, labels: np.ndarray, k: int = 1) -> float:
    """Top-k accuracy with pessimistic ties."""
    return float(np.mean(target_ranks(scores, labels) <= k)) if len(labels) else float("nan")


@dataclass
class LinearProbe:
    """A fitted linear classifier `scores = X @ weight.T + bias` and how its L2 strength was chosen."""

    weight: np.ndarray  # [C, D]
    bias: np.ndarray  # [C]
    l2: float
    val_top1: dict[float, float] = field(default_factory=dict)  # l2 -> held-out accuracy; empty if none held out

    def predict_scores(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(X, np.float32) @ self.weight.T + self.bias  # [N, D] -> [N, C]


SMALL_PROBLEM = 1 << 22  # N * D * C below this trains on one CPU thread


@contextlib.contextmanager
def _one_thread_if_small(work: int, device: torch.device) -> Iterator[None]:
    """Run tiny CPU fits on one intra-op thread, restoring the count afterwards.

    Thread hand-offs cost more than they save on small full-batch problems: an L-BFGS probe on
    128 x 32 features ran 50x slower with 2 threads than with 1 on a busy 2-core machine.
    """
    before = torch.get_num_threads()
    if device.type != "cpu" or work >= SMALL_PROBLEM or before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train_linear(
    X: torch.Tensor, y: torch.Tensor, *, num_classes: int, l2: float, anchor: Optional[torch.Tensor], max_iter: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-batch L-BFGS on mean cross-entropy + l2 * (||W - anchor||^2 + ||b||^2); anchor 0 for a plain probe.

    The bias is penalised too: with one shot per class a free bias alone can fit the shots and
    drag an anchored (blend) classifier below its zero-shot anchor.
    """
    w0 = anchor if anchor is not None else X.new_zeros(num_classes, X.shape[1])
    w = w0.clone().requires_grad_(True)
    b = X.new_zeros(num_classes).requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, history_size=10, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(X @ w.T + b, y) + l2 * ((w - w0).pow(2).sum() + b.pow(2).sum())
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def stratified_split(y: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices; a class with n >= 2 examples holds out max(1, round(n * val_fraction)), else none."""
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        if len(idx) >= 2 and val_fraction > 0:
            val.extend(idx[: max(1, round(len(idx) * val_fraction))])
    is_val = np.zeros(len(y), bool)
    is_val[np.asarray(val, np.int64)] = True
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def fit_linear_probe(
    X: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    *,
    l2_grid: Sequence[float] = PROBE_L2_GRID,
    val_fraction: float = 0.2,
    seed: int = 0,
    max_iter: int = 100,
    anchor: Optional[np.ndarray] = None,
    device: Union[str, torch.device] = "cpu",
) -> LinearProbe:
    """Logistic regression on frozen embeddings; L2 picked on a stratified held-out part, then refit on all.

    Selection maximises held-out accuracy (ties: lower held-out cross-entropy). With nothing to hold
    out (one example per class) the strongest L2 in the grid is used. `anchor` `[C, D]` starts the
    weights there and pulls them toward it instead of toward 0.
    """
    if len(X) != len(y) or len(X) == 0:
        raise ValueError(f"need matching non-empty X and y, got {len(X)} and {len(y)}")
    y = np.asarray(y, np.int64)
    Xt = torch.as_tensor(np.asarray(X, np.float32), device=device)
    yt = torch.as_tensor(y, device=device)
    at = None if anchor is None else torch.as_tensor(np.asarray(anchor, np.float32), device=device)
    with _one_thread_if_small(Xt.numel() * num_classes, Xt.device):
        fit = functools.partial(_train_linear, num_classes=num_classes, anchor=at, max_iter=max_iter)
        l2, val_top1 = _choose_l2(fit, Xt, yt, stratified_split(y, val_fraction, seed), l2_grid)
        w, b = fit(Xt, yt, l2=l2)
    return LinearProbe(w.cpu().numpy(), b.cpu().numpy(), l2, val_top1)


def _choose_l2(
    fit: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    X: torch.Tensor,
    y: torch.Tensor,
    split: tuple[np.ndarray, np.ndarray],
    l2_grid: Sequence[float],
) -> tuple[float, dict[float, float]]:
    """Best L2 by held-out accuracy, then lower held-out cross-entropy; the strongest if nothing is held out."""
    tr, va = (torch.as_tensor(i, device=X.device) for i in split)
    if not len(va) or not len(tr) or len(l2_grid) < 2:
        return float(max(l2_grid)), {}
    val_top1, scored = {}, []
    for l2 in map(float, l2_grid):
        w, b = fit(X[tr], y[tr], l2=l2)
        logits = X[va] @ w.T + b  # [Nv, C]
        val_top1[l2] = accuracy(logits.cpu().numpy(), y[va].cpu().numpy())
        ce = float(torch.nan_to_num(F.cross_entropy(logits, y[va]), nan=np.inf))
        scored.append((-val_top1[l2], ce, l2))
    return min(scored)[2], val_top1


def fit_temperature(logits: np.ndarray, y: np.ndarray, scales: np.ndarray = np.geomspace(1, 100, 25)) -> float:
    """The scale s in [1, 100] minimising cross-entropy of `s * logits` (zero-shot cosines -> calibrated logits)."""
    z = np.nan_to_num(np.asarray(logits, np.float64), nan=-1.0, posinf=1.0, neginf=-1.0)  # [N, C] cosines
    losses = [np.mean(_logsumexp(s * z) - s * z[np.arange(len(y)), y]) for s in scales]
    return float(scales[int(np.argmin(losses))])


def _logsumexp(z: np.ndarray) -> np.ndarray:
    m = z.max(1)
    return m + np.log(np.exp(z - m[:, None]).sum(1))


def fit_blend(
    X: np.ndarray, y: np.ndarray, zs_weights: np.ndarray, *, l2_grid: Sequence[float] = BLEND_L2_GRID, seed: int = 0
) -> LinearProbe:
    """A probe that starts at the zero-shot classifier and is pulled toward it: strong L2 ~ zero-shot, weak ~ probe.

    The anchor is `s * zs_weights` with the temperature s fitted on the shots; the pull strength is
    chosen on held-out shots like `fit_linear_probe` (strongest, i.e. closest to zero-shot, at 1 shot).
    """
    s = fit_temperature(np.asarray(X, np.float32) @ zs_weights.T, y)
    return fit_linear_probe(X, y, len(zs_weights), l2_grid=l2_grid, seed=seed, anchor=s * zs_weights)


@dataclass
class TipAdapter:
    """Training-free cache classifier: zero-shot cosine + alpha * class-mean of exp(-beta (1 - cos)) to the shots.

    Unlike the Tip-Adapter paper the cache term is a per-class mean, not a sum, so a class with fewer
    shots than the others is not penalised.
    """

    keys: np.ndarray  # [M, D] shot embeddings
    labels: np.ndarray  # [M]
    zs_weights: np.ndarray  # [C, D]
    alpha: float
    beta: float

    def predict_scores(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, np.float32)
        return _tip_scores(X @ self.keys.T, self.labels, X @ self.zs_weights.T, self.alpha, self.beta, False)


def _tip_scores(
    cos: np.ndarray, labels: np.ndarray, zs_logits: np.ndarray, alpha: float, beta: float, leave_one_out: bool
) -> np.ndarray:
    onehot = np.eye(zs_logits.shape[1], dtype=np.float32)[labels]  # [M, C]
    affinity = np.exp(-beta * (1.0 - cos))  # [N, M]
    counts = np.broadcast_to(onehot.sum(0), zs_logits.shape).copy()  # [N, C]
    if leave_one_out:  # queries are the keys themselves: drop each one's own entry
        np.fill_diagonal(affinity, 0.0)
        counts -= onehot
    cache = (affinity @ onehot) / np.maximum(counts, 1)  # [N, C]
    return zs_logits + alpha * cache


def fit_tip_adapter(X: np.ndarray, y: np.ndarray, zs_weights: np.ndarray) -> TipAdapter:
    """Pick (alpha, beta) by leave-one-out accuracy on the shots of classes that have at least two."""
    X, y = np.asarray(X, np.float32), np.asarray(y, np.int64)
    C = len(zs_weights)
    eligible = np.bincount(y, minlength=C)[y] >= 2  # [M]
    alpha, beta = TIP_DEFAULT
    if eligible.any():
        cos, zs_logits = X @ X.T, X @ zs_weights.T  # [M, M], [M, C]
        best = -1.0
        for a in TIP_ALPHAS:
            for b in TIP_BETAS:
                s = _tip_scores(cos, y, zs_logits, a, b, True)
                acc = accuracy(s[eligible], y[eligible])
                if acc > best:
                    best, alpha, beta = acc, a, b
    return TipAdapter(X, y, np.asarray(zs_weights, np.float32), alpha, beta)


def sample_shots(y: np.ndarray, k: int, num_classes: int, seed: int) -> np.ndarray:
    """Indices of up to k examples per class (all of a smaller class); for one seed the sets are nested in k."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.permutation(np.flatnonzero(y == c))[:k] for c in range(num_classes)]).astype(np.int64)


def _method_scores(method: str, X: np.ndarray, y: np.ndarray, test_X: np.ndarray, zs: np.ndarray, seed: int) -> np.ndarray:
    if method == "zero_shot":
        return test_X @ zs.T
    if method == "probe":
        return fit_linear_probe(X, y, len(zs), seed=seed).predict_scores(test_X)
    if method == "blend":
        return fit_blend(X, y, zs, seed=seed).predict_scores(test_X)
    if method == "tip_adapter":
        return fit_tip_adapter(X, y, zs).predict_scores(test_X)
    raise ValueError(f"unknown few-shot method {method!r}; choose from {METHODS}")


def few_shot_curve(
    train_X: np.ndarray,
    train_y: np.ndarray,
    test_X: np.ndarray,
    test_y: np.ndarray,
    zs_weights: np.ndarray,
    shots: Sequence[int] = DEFAULT_SHOTS,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    methods: Sequence[str] = METHODS,
) -> pd.DataFrame:
    """Test top-1 of each method trained on k shots per class, for each k and seed.

    Columns: k, seed, method, top1, n_train (shots actually used; smaller classes give what they have).
    `zero_shot` uses no labels, so its value repeats across k and seeds.
    """
    train_X, test_X = np.asarray(train_X, np.float32), np.asarray(test_X, np.float32)
    train_y, test_y = np.asarray(train_y, np.int64), np.asarray(test_y, np.int64)
    zs = np.asarray(zs_weights, np.float32)  # [C, D]
    rows = []
    for seed in seeds:
        for k in shots:
            idx = sample_shots(train_y, int(k), len(zs), int(seed))
            for method in methods:
                scores = _method_scores(method, train_X[idx], train_y[idx], test_X, zs, int(seed))  # [Nt, C]
                top1 = accuracy(scores, test_y)
                rows.append({"k": int(k), "seed": int(seed), "method": method, "top1": top1, "n_train": len(idx)})
    return pd.DataFrame(rows, columns=["k", "seed", "method", "top1", "n_train"])


def summarise_few_shot(df: pd.DataFrame) -> pd.DataFrame:
    """Mean and (sample) std of top-1 over seeds per (k, method); std is 0 for a single seed."""
    out = df.groupby(["k", "method"], sort=True)["top1"].agg(["mean", "std", "count"]).reset_index()
    out["std"] = out["std"].fillna(0.0)
    return out.rename(columns={"count": "seeds"})
