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
from .towers import build_image_tower, build_text_tower, pool_text, text_width

Tokens = Union[torch.Tensor, Mapping[str, torch.Tensor]]
MAX_LOGIT_SCALE = math.log(100)


@dataclass
class ClipOutput:
    """What `CLIPModel.forward` returns: normalised features and the (exponentiated) logit scale/bias."""

    image_features: Optional[torch.Tensor]
    text_features: Optional[torch.Tensor]
    logit_scale: torch.Tensor
    logit_bias: Optional[torch.Tensor] = None


class CLIPModel(nn.Module):
    """Contrastive image-text model; `encode_*` return L2-normalised `[B, embed_dim]` features."""

    def __init__(self, config: ModelConfig, text_model: Optional[PreTrainedModel] = None) -> None:
        super().__init__()
        config = copy.deepcopy(config)  # the model owns its config; the caller's is never changed
        if text_model is None:
            text_model, config.text = build_text_tower(config.text)
        self.config = config
        self.visual = build_image_tower(config.vision)
        self.visual_proj = nn.Linear(self.visual.num_features, config.embed_dim, bias=config.proj_bias)
        self.text = text_model
        self.text_proj = nn.Linear(text_width(self.text), config.embed_dim, bias=config.proj_bias)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))
        bias = config.init_logit_bias
        self.logit_bias = nn.Parameter(torch.tensor(float(bias))) if bias is not None else None
        self.locked: set[str] = set()
        for proj in (self.visual_proj, self.text_proj):
            nn.init.normal_(proj.weight, std=proj.in_features ** -0.5)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    def fingerprint(self) -> str:
        """`sha256:<16 hex>` of the config and weights: the same model loaded from any format has the same id
        (what an index records, so a query with another model is noticed)."""
        h = hashlib.sha256(json.dumps(self.config.to_dict(), sort_keys=True, default=str).encode())
        for name, t in sorted(self.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        return f"sha256:{h.hexdigest()[:16]}"

    def encode_image(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self.visual_proj(self.visual(pixels))  # [B, 3, H, W] -> [B, F] -> [B, D]
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: Tokens, normalize: bool = True) -> torch.Tensor:
        return self.encode_text_pooled(self.text_pooled(tokens), normalize)  # [B, W] -> [B, D]

    def encode_text_pooled(self, pooled: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Project cached `text_pooled` features `[B, W] -> [B, D]` (training with a locked text tower)."""
        x = self.text_proj(pooled.to(self.text_proj.weight.dtype))
        return F.normalize(x, dim=-1) if normalize else x

    def text_pooled(self, tokens: Tokens) -> torch.Tensor:
        """The text tower's pooled output before projection, `[B, W]` (cacheable when the tower is locked)."""
        if isinstance(tokens, torch.Tensor):
            ids, mask = tokens, None
        else:
            ids, mask = tokens["input_ids"], tokens.get("attention_mask")
        device = self.logit_scale.device
        ids = ids.to(device)
        mask = mask.to(device) if mask is not None else self._default_mask(ids)
        hidden = self.text(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, L, W]
        cfg = self.config.text
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

    def lock_image_tower(self) -> None:
        """Freeze the image tower (not its projection); its norm statistics stay fixed in train()."""
        self._lock(self.visual, "image")

    def lock_text_tower(self) -> None:
        """Freeze the text tower (not its projection), e.g. a pretrained MiniLM while images learn."""
        self._lock(self.text, "text")

    def _lock(self, tower: nn.Module, name: str) -> None:
        for p in tower.parameters():
            p.requires_grad_(False)
        tower.eval()
        self.locked.add(name)

    def train(self, mode: bool = True) -> "CLIPModel":
        super().train(mode)
        if "image" in self.locked:
            self.visual.eval()
        if "text" in self.locked:
            self.text.eval()
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        if enable:
            self.text.gradient_checkpointing_enable()
        else:
            self.text.gradient_checkpointing_disable()
