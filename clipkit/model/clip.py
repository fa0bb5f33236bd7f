"""CLIPModel: image tower + text tower + projections into one L2-normalised space, and a logit scale."""
from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from .config import ModelConfig
from .groups import (Groups, batch_norms_within, frozen_by_groups, image_groups, is_clip_text, is_clip_vit,
                     norm_names, text_groups, with_prefix)
from .towers import build_image_tower, build_text_tower, pool_text, text_width, trim_padding

Tokens = Union[torch.Tensor, Mapping[str, torch.Tensor]]
MAX_LOGIT_SCALE = math.log(100)


@dataclass
class ClipOutput:
    """What `CLIPModel.forward` returns: normalised features and the (exponentiated) logit scale/bias."""

    image_features: Optional[torch.Tensor]
    text_features: Optional[torch.Tensor]
    logit_scale: torch.Tensor
    logit_bias: Optional[torch.Tensor] = None


def _project(proj: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A tower's projection, outside autocast: in the weights' own dtype (float32 unless the model was cast), as
    measured in `benchmarks/bench_precision.py` it costs little and keeps bf16 neighbours closer to fp32's."""
    w = getattr(proj, "weight", None)  # a method, not a tensor, once quantised to int8
    with torch.autocast(x.device.type, enabled=False):
        return proj(x.to(w.dtype) if isinstance(w, torch.Tensor) else x.float())


class CLIPModel(nn.Module):
    """Contrastive image-text model; `encode_*` return L2-normalised `[B, embed_dim]` features."""

    def __init__(self, config: ModelConfig, text_model: Optional[PreTrainedModel] = None) -> None:
        super().__init__()
        config = copy.deepcopy(config)  # the model owns its config; the caller's is never changed
        if text_model is None:
            text_model, config.text = build_text_tower(config.text)
        self.config = config
        self.visual, config.vision = build_image_tower(config.vision)
        self.visual_proj = nn.Linear(self.visual.num_features, config.embed_dim, bias=config.proj_bias)
        self.text = text_model
        self.text_proj = nn.Linear(text_width(self.text), config.embed_dim, bias=config.proj_bias)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))
        bias = config.init_logit_bias
        self.logit_bias = nn.Parameter(torch.tensor(float(bias))) if bias is not None else None
        self.locked: set[str] = set()  # towers frozen whole (kept in eval mode)
        self.frozen_stats: list[str] = []  # BatchNorm layers of frozen groups (kept in eval mode)
        for proj in (self.visual_proj, self.text_proj):
            nn.init.normal_(proj.weight, std=proj.in_features ** -0.5)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    def fingerprint(self) -> str:
        """`sha256:<16 hex>` of the weights and the few config fields that change outputs for equal weights
        (tower names, activation, pooling): the same model loaded from any format, or by a newer clipkit that
        added config fields, has the same id. An index records it, so a query with another model is noticed."""
        cfg = self.config
        arch = [cfg.vision.timm_name, cfg.vision.timm_kwargs, cfg.text.hf_config.get("hidden_act"), cfg.text.pooling,
                cfg.text.eot_token_id, cfg.embed_dim]
        h = hashlib.sha256(json.dumps(arch, sort_keys=True, default=str).encode())
        for name, t in sorted(self.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        return f"sha256:{h.hexdigest()[:16]}"

    def encode_image(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = _project(self.visual_proj, self.visual(pixels))  # [B, 3, H, W] -> [B, F] -> [B, D]
        return F.normalize(x.float(), dim=-1) if normalize else x  # float32 unit rows, whatever ran inside

    def encode_text(self, tokens: Tokens, normalize: bool = True) -> torch.Tensor:
        return self.encode_text_pooled(self.text_pooled(tokens), normalize)  # [B, W] -> [B, D]

    def encode_text_pooled(self, pooled: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Project cached `text_pooled` features `[B, W] -> [B, D]` (training with a locked text tower)."""
        x = _project(self.text_proj, pooled)
        return F.normalize(x.float(), dim=-1) if normalize else x

    def text_pooled(self, tokens: Tokens) -> torch.Tensor:
        """The text tower's pooled output before projection, `[B, W]` (cacheable when the tower is locked)."""
        if isinstance(tokens, torch.Tensor):  # raw ids, or a tokenizer's TokenIds carrying their mask
            ids, mask = tokens, getattr(tokens, "attention_mask", None)
        else:
            ids, mask = tokens["input_ids"], tokens.get("attention_mask")
        cfg = self.config.text
        ids = ids.as_subclass(torch.Tensor) if isinstance(ids, torch.Tensor) else ids
        mask = mask if mask is not None else self._default_mask(ids)
        ids, mask = trim_padding(ids, mask, cfg.eot_token_id, causal=is_clip_text(self.text))  # [B, L] -> [B, l]
        device = self.logit_scale.device
        ids, mask = ids.to(device), mask.to(device) if mask is not None else None
        hidden = self.text(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, l, W]
        return pool_text(hidden, ids, mask, cfg.pooling, cfg.eot_token_id)

    def _default_mask(self, ids: torch.Tensor) -> Optional[torch.Tensor]:
        """Bidirectional towers (BERT) need a padding mask; causal CLIP towers pool at the end token."""
        pad = self.text.config.pad_token_id
        if self.config.text.pooling == "eot" or pad is None:
            return None
        return (ids != pad).long()

    def scales(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The exponentiated logit scale (capped at 100) and the logit bias."""
        return self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp(), self.logit_bias

    def forward(
        self,
        pixels: Optional[torch.Tensor] = None,
        tokens: Optional[Tokens] = None,
        text_pooled: Optional[torch.Tensor] = None,
    ) -> ClipOutput:
        """Features for a batch; `text_pooled` (cached locked-tower output) replaces `tokens` when given."""
        img = self.encode_image(pixels) if pixels is not None else None
        if text_pooled is not None:
            txt = self.encode_text_pooled(text_pooled)
        else:
            txt = self.encode_text(tokens) if tokens is not None else None
        scale, bias = self.scales()
        return ClipOutput(img, txt, scale, bias)

    def lock_image_tower(self, unlocked_groups: Optional[int] = None, freeze_bn_stats: bool = False) -> None:
        """Freeze the image tower; its projection still trains (LiT). `unlocked_groups=N` leaves the last N layer
        groups trainable, counted as open_clip counts them (`clipkit.model.groups`; for a CLIP ViT the projection
        is the last group, so N=0 freezes it too). `freeze_bn_stats`: BatchNorm layers in frozen groups keep
        their running statistics. A tower frozen whole stays in eval mode in train()."""
        proj = "visual_proj." if is_clip_vit(self.visual) else None
        frozen = self._lock("image", with_prefix(image_groups(self.visual), "visual."), proj, unlocked_groups, set())
        if freeze_bn_stats:
            self.frozen_stats += ["visual." + n for n in batch_norms_within(self.visual, frozen, "visual.")]
            self.train(self.training)

    def lock_text_tower(self, unlocked_layers: Optional[int] = None, freeze_layer_norm: bool = True) -> None:
        """Freeze the text tower (not its projection), e.g. a pretrained MiniLM while images learn.
        `unlocked_layers=N` leaves the last N layer groups trainable, counted as open_clip counts them (a CLIP text
        transformer's projection is the last group); `freeze_layer_norm=False` keeps LayerNorms trainable."""
        keep = set() if freeze_layer_norm else norm_names(self.text, "text.", (nn.LayerNorm,))
        proj = "text_proj." if is_clip_text(self.text) else None
        self._lock("text", with_prefix(text_groups(self.text), "text."), proj, unlocked_layers, keep)

    def _lock(self, name: str, groups: Groups, proj: Optional[str], unlocked: Optional[int],
              keep: set[str]) -> set[str]:
        """Freeze the whole tower (`unlocked` None) or all but the last `unlocked` of its groups, followed by the
        projection (the parameters under the prefix `proj`) when open_clip counts it as a group; `keep` trains."""
        tower = self.visual if name == "image" else self.text
        prefix = "visual." if name == "image" else "text."
        if unlocked is None:
            frozen = {prefix + n for n, _ in tower.named_parameters()}
        else:
            proj_group = [[n for n, _ in self.named_parameters() if n.startswith(proj)]] if proj else []
            frozen = frozen_by_groups(groups + proj_group, unlocked)
        frozen -= keep
        for n, p in self.named_parameters():
            if n in frozen:
                p.requires_grad_(False)
        if not any(p.requires_grad for p in tower.parameters()):
            tower.eval()
            self.locked.add(name)
        return frozen

    def train(self, mode: bool = True) -> "CLIPModel":
        super().train(mode)
        if "image" in self.locked:
            self.visual.eval()
        if "text" in self.locked:
            self.text.eval()
        for name in self.frozen_stats:
            self.get_submodule(name).eval()
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        if enable:
            self.text.gradient_checkpointing_enable()
        else:
            self.text.gradient_checkpointing_disable()
