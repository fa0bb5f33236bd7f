"""Tests for clipkit.train.losses: hand-computed values, open_clip parity, 2-process gloo equivalence,
gradient-cache equivalence, and degenerate inputs."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn

from clipkit.train.losses import ClipLoss, SigLipLoss, create_loss, grad_cache_step

ATOL = 1e-6


def _unit(*shape: int, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def _close(actual: Tensor, expected: Tensor, what: str) -> None:
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0, msg=lambda m: f"{what}: {m}")


def _assert_same(actual: dict[str, Tensor], expected: dict[str, Tensor], prefix: str = "") -> None:
    for key in actual:
        _close(actual[key], expected[key], prefix + key)


def _np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


# --- (a) hand-computed cases ----------------------------------------------------------------------


def test_clip_loss_hand_computed_2x2() -> None:
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    # logits = 2 * img @ txt.T = [[2, 1.2], [0, 1.6]]; rows are images, columns are texts
    lse = lambda a, b: math.log(math.exp(a) + math.exp(b))  # noqa: E731
    image_to_text = ((lse(2, 1.2) - 2) + (lse(0, 1.6) - 1.6)) / 2
    text_to_image = ((lse(2, 0) - 2) + (lse(1.2, 1.6) - 1.6)) / 2
    expected = (image_to_text + text_to_image) / 2
    assert ClipLoss()(img, txt, 2.0).item() == pytest.approx(expected, abs=ATOL)


def test_clip_loss_label_smoothing_3x3() -> None:
    img = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.6, 0.8, 0.0]])
    txt = np.array([[0.8, 0.6, 0.0], [0.0, 0.6, 0.8], [0.0, 0.0, 1.0]])
    scale, eps, n = 3.0, 0.1, 3
    # smoothed target: 1 - eps + eps/n on the diagonal, eps/n elsewhere
    target = np.full((n, n), eps / n) + np.eye(n) * (1 - eps)
    logits = scale * img @ txt.T
    expected = sum(-(target * _np_log_softmax(z)).sum(axis=1).mean() for z in (logits, logits.T)) / 2
    got = ClipLoss(label_smoothing=eps)(torch.tensor(img), torch.tensor(txt), scale)
    assert got.item() == pytest.approx(expected, abs=ATOL)


def test_siglip_loss_hand_computed_2x2() -> None:
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    scale, bias = 2.0, -1.0
    logits = [[2 * 1 - 1, 2 * 0.6 - 1], [2 * 0 - 1, 2 * 0.8 - 1]]
    neg_log_sigmoid = lambda z: math.log1p(math.exp(-z))  # noqa: E731
    total = sum(neg_log_sigmoid((1 if i == j else -1) * logits[i][j]) for i in range(2) for j in range(2))
    assert SigLipLoss()(img, txt, scale, bias).item() == pytest.approx(total / 2, abs=ATOL)


# --- (b) parity with open_clip --------------------------------------------------------------------


def _loss_and_grads(loss_fn: nn.Module, bias: float | None) -> tuple[Tensor, list[Tensor]]:
    img, txt = _unit(8, 16, seed=1).requires_grad_(), _unit(8, 16, seed=2).requires_grad_()
    scale = torch.tensor(12.5, requires_grad=True)
    loss = loss_fn(img, txt, scale, None if bias is None else torch.tensor(bias))
    return loss.detach(), list(torch.autograd.grad(loss, [img, txt, scale]))


def test_clip_loss_matches_open_clip() -> None:
    open_clip_loss = pytest.importorskip("open_clip.loss")
    ours, ours_grads = _loss_and_grads(ClipLoss(), None)
    ref, ref_grads = _loss_and_grads(open_clip_loss.ClipLoss(), None)
    _close(ours, ref, "loss")
    for name, a, b in zip(["d image", "d text", "d scale"], ours_grads, ref_grads):
        _close(a, b, name)


def test_siglip_loss_matches_open_clip() -> None:
    open_clip_loss = pytest.importorskip("open_clip.loss")
    ours, ours_grads = _loss_and_grads(SigLipLoss(), -3.0)
    ref, ref_grads = _loss_and_grads(open_clip_loss.SigLipLoss(), -3.0)
    _close(ours, ref, "loss")
    for name, a, b in zip(["d image", "d text", "d scale"], ours_grads, ref_grads):
        _close(a, b, name)


def test_create_loss() -> None:
    assert isinstance(create_loss("clip", label_smoothing=None), ClipLoss)
    assert create_loss("clip", label_smoothing=0.2).label_smoothing == 0.2
    assert isinstance(create_loss("siglip", gather=False), SigLipLoss)
    with pytest.raises(ValueError, match="unknown loss"):
        create_loss("triplet")


# --- (c) two processes over gloo == one process with the full batch -------------------------------

DIST_CASES = {"clip": ("clip", {}), "clip_smooth": ("clip", {"label_smoothing": 0.1}), "siglip": ("siglip", {})}
FULL_BATCH = 8


class PairEncoder(nn.Module):
    """Two linear towers plus learnable logit scale and bias: the smallest CLIP."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():  # same weights every time, global RNG untouched
            torch.manual_seed(0)
            self.image = nn.Linear(6, 4)
            self.text = nn.Linear(5, 4)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.logit_bias = nn.Parameter(torch.tensor(-2.0))
        self.double()  # float64: equivalence is checked to 1e-6 absolute, beyond float32's rounding

    def forward(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        img, txt = F.normalize(self.image(x), dim=-1), F.normalize(self.text(t), dim=-1)
        return img, txt, self.logit_scale.exp(), self.logit_bias


def _fixed_batch() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(123)
    shape = {"generator": g, "dtype": torch.float64}
    return torch.randn(FULL_BATCH, 6, **shape), torch.randn(FULL_BATCH, 5, **shape)


def _train_step(model: nn.Module, loss_fn: nn.Module, x: Tensor, t: Tensor) -> dict[str, Tensor]:
    """Loss and parameter gradients of one step (names without DDP's `module.` prefix)."""
    loss = loss_fn(*model(x, t))
    loss.backward()
    grads = {n.removeprefix("module."): p.grad.clone() for n, p in model.named_parameters()}
    return {"loss": loss.detach(), **grads}


def _dist_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        x, t = _fixed_batch()
        rows = slice(rank * FULL_BATCH // world, (rank + 1) * FULL_BATCH // world)
        results = {}
        for case, (name, kw) in DIST_CASES.items():
            model = nn.parallel.DistributedDataParallel(PairEncoder())  # averages grads over ranks
            results[case] = _train_step(model, create_loss(name, **kw), x[rows], t[rows])
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # ~10 s: spawning two interpreters that import torch
def test_two_process_gather_matches_single_process(tmp_path: Path) -> None:
    world = 2
    mp.spawn(_dist_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    x, t = _fixed_batch()
    for case, (name, kw) in DIST_CASES.items():
        ref = _train_step(PairEncoder(), create_loss(name, **kw), x, t)
        # global-batch loss is the mean of the rank losses
        mean_loss = sum(r[case]["loss"] for r in ranks) / world
        _close(mean_loss, ref["loss"], f"{case} loss")
        for rank, res in enumerate(ranks):  # DDP left the same averaged gradients on every rank
            _assert_same({k: v for k, v in res[case].items() if k != "loss"}, ref, f"{case} rank {rank} ")


# --- (d) gradient cache == plain backward ---------------------------------------------------------


class DropoutTowers(nn.Module):
    """Image MLP and masked-mean-pooled token embedding, both with dropout, to exercise RNG replay."""

    def __init__(self, p: float = 0.3) -> None:
        super().__init__()
        with torch.random.fork_rng():  # same weights every time, global RNG untouched
            torch.manual_seed(0)
            self.image = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Dropout(p), nn.Linear(16, 4))
            self.embed = nn.Embedding(20, 16)
            self.text = nn.Sequential(nn.Dropout(p), nn.Linear(16, 4))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.logit_bias = nn.Parameter(torch.tensor(-2.0))
        self.double()  # float64: equivalence is checked to 1e-6 absolute, beyond float32's rounding

    def encode_image(self, x: Tensor) -> Tensor:
        return F.normalize(self.image(x), dim=-1)

    def encode_text(self, tokens: Tensor | dict[str, Tensor]) -> Tensor:
        ids = tokens["input_ids"] if isinstance(tokens, dict) else tokens
        mask = tokens["attention_mask"] if isinstance(tokens, dict) else torch.ones_like(ids)
        mask = mask.unsqueeze(-1).to(self.embed.weight.dtype)  # [B, L] -> [B, L, 1]
        pooled = (self.embed(ids) * mask).sum(1) / mask.sum(1).clamp(min=1)  # [B, L, W] -> [B, W]
        return F.normalize(self.text(pooled), dim=-1)


def _gc_batch(dict_tokens: bool) -> tuple[Tensor, Tensor | dict[str, Tensor]]:
    g = torch.Generator().manual_seed(7)
    images = torch.randn(8, 6, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 20, (8, 5), generator=g)
    if not dict_tokens:
        return images, ids
    mask = (torch.arange(5)[None, :] < torch.randint(1, 6, (8, 1), generator=g)).long()
    return images, {"input_ids": ids, "attention_mask": mask}


def _plain_step(model: DropoutTowers, loss_fn: nn.Module, images: Tensor, tokens, chunk: int) -> dict[str, Tensor]:
    """Ordinary backward through one graph, encoding chunk by chunk so dropout draws the same masks."""
    img, txt = [], []
    for s in range(0, images.shape[0], chunk):
        img.append(model.encode_image(images[s : s + chunk]))
        sl = {k: v[s : s + chunk] for k, v in tokens.items()} if isinstance(tokens, dict) else tokens[s : s + chunk]
        txt.append(model.encode_text(sl))
    loss = loss_fn(torch.cat(img), torch.cat(txt), model.logit_scale.exp(), model.logit_bias)
    loss.backward()
    return {"loss": loss.detach(), **{n: p.grad.clone() for n, p in model.named_parameters()}}


def _cached_step(model: DropoutTowers, loss_fn: nn.Module, images: Tensor, tokens, chunk: int) -> dict[str, Tensor]:
    loss = grad_cache_step(
        model.encode_image, model.encode_text, images, tokens, loss_fn,
        model.logit_scale.exp(), model.logit_bias, chunk_size=chunk,
    )
    return {"loss": loss, **{n: p.grad.clone() for n, p in model.named_parameters()}}




@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
@pytest.mark.parametrize("dict_tokens", [True, False])
def test_grad_cache_matches_plain_batch_with_dropout(loss_name: str, dict_tokens: bool) -> None:
    images, tokens = _gc_batch(dict_tokens)
    loss_fn = create_loss(loss_name)
    torch.manual_seed(99)
    plain = _plain_step(DropoutTowers(), loss_fn, images, tokens, chunk=8)
    torch.manual_seed(99)
    cached = _cached_step(DropoutTowers(), loss_fn, images, tokens, chunk=8)
    _assert_same(plain, cached)
    torch.manual_seed(99)
    cached_3 = _cached_step(DropoutTowers(), loss_fn, images, tokens, chunk=3)  # uneven last chunk
    torch.manual_seed(99)
    _assert_same(_plain_step(DropoutTowers(), loss_fn, images, tokens, chunk=3), cached_3)
    # guard: dropout is live, so masks that failed to replay would show up as a gradient mismatch
    torch.manual_seed(100)
    other = _plain_step(DropoutTowers(), loss_fn, images, tokens, chunk=3)
    assert (other["image.0.weight"] - cached_3["image.0.weight"]).abs().max() > 1e-4


@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_grad_cache_matches_unchunked_batch_without_dropout(loss_name: str) -> None:
    images, tokens = _gc_batch(dict_tokens=True)
    loss_fn = create_loss(loss_name)
    plain = _plain_step(DropoutTowers(p=0.0), loss_fn, images, tokens, chunk=8)  # one forward, whole batch
    _assert_same(plain, _cached_step(DropoutTowers(p=0.0), loss_fn, images, tokens, chunk=3))


# --- (e) sanity and degenerate inputs -------------------------------------------------------------


@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_aligned_pairs_score_lower_than_random(loss_name: str) -> None:
    loss_fn = create_loss(loss_name)
    img = _unit(16, 32, seed=3)
    aligned = loss_fn(img, img.clone(), 10.0, -5.0)
    shuffled = loss_fn(img, _unit(16, 32, seed=4), 10.0, -5.0)
    assert aligned < shuffled


@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_zero_vectors_give_finite_loss_and_grads(loss_name: str) -> None:
    img = torch.zeros(4, 8, requires_grad=True)
    txt = torch.zeros(4, 8, requires_grad=True)
    scale = torch.tensor(10.0, requires_grad=True)
    loss = create_loss(loss_name)(img, txt, scale, torch.tensor(-5.0))
    loss.backward()
    assert torch.isfinite(loss)
    for grad in (img.grad, txt.grad, scale.grad):
        assert torch.isfinite(grad).all()
