"""Layer groups of the two towers, counted as open_clip counts them: what partial locking and layer-wise
learning-rate decay work on.

A CLIP ViT image tower (timm ViT with a pre-norm, what open_clip's own VisionTransformer is) has the groups
[embeddings + pre-norm], each block but the last, [last block + final norm], and the projection counts as the
last group, as in open_clip's `VisionTransformer.lock`. Other timm towers have timm's own layer groups
(`group_matcher`) and their projection always trains, as in open_clip's `TimmModel.lock`. Text towers follow
open_clip in the same way: a CLIP text transformer has [embeddings], each layer but the last, [last layer + final
norm] and its projection last (`lock_text_tower`); other transformers models have [embeddings, *layers]
(`HFTextEncoder.lock`).
"""
from __future__ import annotations

import re

from timm.models import group_parameters
from torch import nn

_LAYER = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)\.")
Groups = list[list[str]]


def is_clip_vit(visual: nn.Module) -> bool:
    """A timm ViT with a LayerNorm before its blocks: the layout of OpenAI's and open_clip's CLIP ViTs."""
    return hasattr(visual, "blocks") and isinstance(getattr(visual, "norm_pre", None), nn.LayerNorm)


def is_clip_text(text: nn.Module) -> bool:
    return getattr(getattr(text, "config", None), "model_type", None) == "clip_text_model"


def image_groups(visual: nn.Module) -> Groups:
    """Parameter names of a timm image tower by layer group, input side first."""
    by_id = group_parameters(visual, visual.group_matcher())  # a final norm joins the last block's group
    return [list(by_id[k]) for k in sorted(by_id)]


def text_groups(text: nn.Module) -> Groups:
    """Parameter names of a transformers text tower by layer group: embeddings, layers, and whatever follows
    the layers (a final norm) with the last layer for a CLIP text transformer."""
    named = [n for n, _ in text.named_parameters()]
    layers = sorted({int(m.group(1)) for n in named if (m := _LAYER.search(n))})
    groups: Groups = [[] for _ in range(len(layers) + 1)]
    index = {layer: i + 1 for i, layer in enumerate(layers)}
    for n in named:
        m = _LAYER.search(n)
        if m:
            groups[index[int(m.group(1))]].append(n)
        elif "embed" in n:
            groups[0].append(n)
        else:
            groups[-1].append(n)  # final norms and the like
    return [g for g in groups if g]


def with_prefix(groups: Groups, prefix: str) -> Groups:
    return [[prefix + n for n in g] for g in groups]


def frozen_by_groups(groups: Groups, unlocked: int) -> set[str]:
    """Every name outside the last `unlocked` groups."""
    if unlocked < 0:
        raise ValueError(f"the number of unlocked layer groups must be >= 0, got {unlocked}")
    keep = len(groups) - unlocked
    return {n for g in groups[: max(keep, 0)] for n in g}


def norm_names(module: nn.Module, prefix: str, kinds: tuple[type, ...]) -> set[str]:
    """Names (with `prefix`) of the parameters of norm layers of the given kinds."""
    return {prefix + ".".join(filter(None, (m_name, p_name))) for m_name, m in module.named_modules()
            if isinstance(m, kinds) for p_name, _ in m.named_parameters(recurse=False)}


def batch_norms_within(module: nn.Module, frozen: set[str], prefix: str) -> list[str]:
    """Names of the BatchNorm layers whose parameters are all in `frozen`: their running statistics stay fixed."""
    out = []
    for name, m in module.named_modules():
        params = [prefix + ".".join(filter(None, (name, p))) for p, _ in m.named_parameters(recurse=False)]
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and params and all(p in frozen for p in params):
            out.append(name)
    return out
