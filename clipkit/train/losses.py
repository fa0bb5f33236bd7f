"""Contrastive losses: symmetric InfoNCE (CLIP) and sigmoid (SigLIP), a distributed all-gather, and a
gradient cache that trains on batches larger than one autograd graph fits in memory.

Multi-process convention (both losses, gather=True): each rank scores its own B rows against the
gathered N*B columns and returns the MEAN over its rows of the per-row loss. The global-batch loss is
then the mean of the N rank losses, and because the all-gather's backward SUMS each slice's gradient
over ranks, DDP's gradient averaging (sum / N) gives exactly the gradient of the global-batch loss:
multiply by nothing. Every rank must pass the same batch size B (all-gather needs equal shapes).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

Tokens = Union[Tensor, Mapping[str, Any]]


def world_info() -> tuple[int, int]:
    """(rank, world_size) of the default process group, or (0, 1) when not running distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGather(torch.autograd.Function):
    """All-gather whose backward sums every rank's gradient for each slice and returns it to its owner."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        return torch.cat(parts, dim=0)  # N x [B, D] -> [N * B, D]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)  # all_reduce is in place; the grad is not ours
        dist.all_reduce(grad)  # sum over ranks: every rank's loss used every slice
        return grad.chunk(dist.get_world_size(), dim=0)[dist.get_rank()]  # [N * B, D] -> [B, D]


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate `x` from every rank in rank order ([B, D] -> [N * B, D]), gradients flowing back."""
    return _AllGather.apply(x)


def _gather_if(enabled: bool, x: Tensor) -> tuple[Tensor, int]:
    """All-gathered `x` and this rank's row offset in it, or `x` and 0 when not gathering."""
    rank, world = world_info()
    if not enabled or world == 1:
        return x, 0
    return gather_with_grad(x), rank * x.shape[0]


class ClipLoss(nn.Module):
    """Symmetric InfoNCE: cross-entropy of image->text and text->image logits, averaged.

    With gather=True under torch.distributed, negatives come from every rank (see module docstring).
    """

    def __init__(self, label_smoothing: float = 0.0, gather: bool = True) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing
        self.gather = gather

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Union[Tensor, float],
        logit_bias: Optional[Union[Tensor, float]] = None,
    ) -> Tensor:
        """Loss of this rank's rows; `logit_scale` is already exponentiated. A bias (accepted for a
        uniform signature) shifts every logit equally, so it does not change the softmax."""
        all_images, offset = _gather_if(self.gather, image_features)
        all_texts, _ = _gather_if(self.gather, text_features)
        logits_per_image = logit_scale * image_features @ all_texts.T  # [B, D] x [D, N*B] -> [B, N*B]
        logits_per_text = logit_scale * text_features @ all_images.T  # [B, D] x [D, N*B] -> [B, N*B]
        if logit_bias is not None:
            logits_per_image = logits_per_image + logit_bias
            logits_per_text = logits_per_text + logit_bias
        labels = torch.arange(image_features.shape[0], device=image_features.device) + offset
        loss_i = F.cross_entropy(logits_per_image, labels, label_smoothing=self.label_smoothing)
        loss_t = F.cross_entropy(logits_per_text, labels, label_smoothing=self.label_smoothing)
        return (loss_i + loss_t) / 2


class SigLipLoss(nn.Module):
    """Sigmoid loss (SigLIP): each image-text pair is a binary match/no-match with learnable scale and bias.

    With gather=True under torch.distributed, text features are gathered from every rank.
    """

    def __init__(self, gather: bool = True) -> None:
        super().__init__()
        self.gather = gather

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Union[Tensor, float],
        logit_bias: Optional[Union[Tensor, float]] = None,
    ) -> Tensor:
        """Sum over this rank's rows and all columns of -logsigmoid(+-logit), divided by the local B."""
        all_texts, offset = _gather_if(self.gather, text_features)
        logits = logit_scale * image_features @ all_texts.T  # [B, D] x [D, N*B] -> [B, N*B]
        if logit_bias is not None:
            logits = logits + logit_bias
        n_rows, n_cols = logits.shape
        rows = torch.arange(n_rows, device=logits.device) + offset
        is_match = rows[:, None] == torch.arange(n_cols, device=logits.device)[None, :]  # [B, N*B]
        labels = is_match.to(logits.dtype) * 2 - 1  # +1 on this rank's diagonal, -1 elsewhere
        return -F.logsigmoid(labels * logits).sum() / n_rows


LOSSES: dict[str, type[nn.Module]] = {"clip": ClipLoss, "siglip": SigLipLoss}


def create_loss(name: str, **kwargs: Any) -> nn.Module:
    """Build a loss by name ("clip" | "siglip"); keyword arguments left as None are dropped (unset)."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}")
    return LOSSES[name](**{k: v for k, v in kwargs.items() if v is not None})


# --- gradient cache -------------------------------------------------------------------------------

RngState = tuple[Tensor, Optional[list[Tensor]]]


def _get_rng_state() -> RngState:
    """CPU and (if in use) all CUDA generator states, so a chunk can replay the same dropout masks."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: RngState) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def _rows(batch: Tokens, start: int, end: int) -> Tokens:
    """Rows [start, end) of a tensor, or of every tensor in a dict (input_ids, attention_mask, ...)."""
    if isinstance(batch, Mapping):
        return {k: v[start:end] if torch.is_tensor(v) else v for k, v in batch.items()}
    return batch[start:end]


def grad_cache_step(
    encode_image: Callable[[Tensor], Tensor],
    encode_text: Callable[[Tokens], Tensor],
    images: Tensor,
    tokens: Tokens,
    loss_fn: Callable[..., Tensor],
    logit_scale: Union[Tensor, float],
    logit_bias: Optional[Union[Tensor, float]] = None,
    chunk_size: int = 32,
) -> Tensor:
    """One contrastive step in chunks of `chunk_size` rows, with the gradients of the unchunked batch.

    Runs backward itself (parameters, and logit scale/bias through the graph they were computed in,
    accumulate .grad) and returns the detached loss. Memory holds one chunk's graph, not the batch's.
    Under DDP pass `ddp.module`'s encoders and average gradients over ranks after the step.
    """
    n = images.shape[0]
    spans = [(i, min(i + chunk_size, n)) for i in range(0, n, chunk_size)]
    # pass 1: embeddings without a graph, remembering the RNG state each chunk started from
    states, image_chunks, text_chunks = [], [], []
    with torch.no_grad():
        for start, end in spans:
            states.append(_get_rng_state())
            image_chunks.append(encode_image(images[start:end]))
            text_chunks.append(encode_text(_rows(tokens, start, end)))
    # loss on leaf embeddings: backward leaves d loss / d embedding in their .grad
    image_emb = torch.cat(image_chunks).requires_grad_()  # chunks of [c, D] -> [B, D]
    text_emb = torch.cat(text_chunks).requires_grad_()
    loss = loss_fn(image_emb, text_emb, logit_scale, logit_bias)
    loss.backward()
    # pass 2: replay each chunk with a graph and the same RNG, push its slice of the embedding gradient
    after_pass_1 = _get_rng_state()
    for (start, end), state in zip(spans, states):
        _set_rng_state(state)
        image_out = encode_image(images[start:end])
        text_out = encode_text(_rows(tokens, start, end))
        grads = [image_emb.grad[start:end], text_emb.grad[start:end]]
        torch.autograd.backward([image_out, text_out], grads)
    _set_rng_state(after_pass_1)
    return loss.detach()
