"""OpenCLIP and OpenAI ViT CLIP state dicts (`.pt`, `.bin`, `.safetensors`): read into clipkit's layout.

Shapes are read from the weights; the activation and preprocessing come from the named preset (`arch`),
because a state dict does not record them.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import CheckpointError
from ..model.config import ModelConfig, PreprocessConfig, TextConfig, VisionConfig, clip_text_config, get_preset
from ..model.factory import bind_tokenizer, tokenizer_for
from ..model.tokenizer import Tokenizer
from .layout import CLIP_VIT, RenameTable, rename, vision_kwargs
from .weights import StateDict, read_safetensors, safe_torch_load

_VISION_RENAMES: RenameTable = [  # OpenCLIP visual.* names -> timm ViT names
    ("^conv1.", "patch_embed.proj."),
    ("^ln_pre.", "norm_pre."),
    ("^ln_post.", "norm."),
    ("^transformer.resblocks.", "blocks."),
    (".ln_1.", ".norm1."),
    (".ln_2.", ".norm2."),
    (".attn.in_proj_", ".attn.qkv."),
    (".attn.out_proj.", ".attn.proj."),
    (".mlp.c_fc.", ".mlp.fc1."),
    (".mlp.c_proj.", ".mlp.fc2."),
]
_TEXT_RENAMES: RenameTable = [  # OpenCLIP text transformer names -> transformers CLIPTextModel names
    ("^token_embedding.weight", "embeddings.token_embedding.weight"),
    ("^positional_embedding", "embeddings.position_embedding.weight"),
    ("^transformer.resblocks.", "encoder.layers."),
    (".attn.out_proj.", ".self_attn.out_proj."),
    (".ln_1.", ".layer_norm1."),
    (".ln_2.", ".layer_norm2."),
    (".mlp.c_fc.", ".mlp.fc1."),
    (".mlp.c_proj.", ".mlp.fc2."),
    ("^ln_final.", "final_layer_norm."),
]


def unwrap_state_dict(obj: Any) -> StateDict:
    """The tensor dict inside an OpenCLIP training checkpoint (`state_dict`, `module.` prefixes)."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError("expected a state dict of tensors (or a checkpoint with a `state_dict` entry)")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


def config_from_openclip(sd: StateDict, arch: Optional[str] = None, quick_gelu: Optional[bool] = None) -> ModelConfig:
    """Infer a ViT CLIP's shapes from an OpenCLIP/OpenAI state dict; `arch` supplies activation and preprocessing."""
    if "visual.conv1.weight" not in sd:
        raise CheckpointError("only ViT OpenCLIP/OpenAI checkpoints are supported (no visual.conv1.weight found)")
    base = get_preset(arch) if arch else get_preset("ViT-B-32")
    if quick_gelu is None:
        quick_gelu = base.vision.timm_kwargs.get("act_layer") == "quick_gelu"
    act = "quick_gelu" if quick_gelu else "gelu"
    conv = sd["visual.conv1.weight"]
    width, patch = conv.shape[0], conv.shape[-1]
    image = patch * round(math.sqrt(sd["visual.positional_embedding"].shape[0] - 1))
    layers = len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")})
    mlp = sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    tw = sd["ln_final.weight"].shape[0]
    tlayers = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
    ctx, vocab = sd["positional_embedding"].shape[0], sd["token_embedding.weight"].shape[0]
    return ModelConfig(
        embed_dim=sd["text_projection"].shape[1],
        vision=VisionConfig(CLIP_VIT, vision_kwargs(width, layers, width // 64, mlp, image, patch, act)),
        text=TextConfig(hf_config=clip_text_config(tw, tlayers, tw // 64, ctx, vocab, act), pooling="eot",
                        context_length=ctx, eot_token_id=None),
        preprocess=PreprocessConfig(**{**vars(base.preprocess), "image_size": image}),
    )


def _vision_state(sd: StateDict) -> StateDict:
    """OpenCLIP `visual.*` weights -> clipkit `visual.*` (timm ViT) and `visual_proj.weight`."""
    out: StateDict = {}
    for k, v in sd.items():
        if not k.startswith("visual."):
            continue
        k = k[len("visual."):]
        if k == "class_embedding":
            out["visual.cls_token"] = v.reshape(1, 1, -1)
        elif k == "positional_embedding":
            out["visual.pos_embed"] = v.unsqueeze(0)
        elif k == "proj":
            out["visual_proj.weight"] = v.t()
        else:
            out["visual." + rename(k, _VISION_RENAMES)] = v
    return out


def state_from_openclip(sd: StateDict) -> StateDict:
    """OpenCLIP/OpenAI ViT CLIP state dict -> clipkit CLIPModel state dict."""
    out = _vision_state(sd)
    for k, v in sd.items():
        if k.startswith("visual.") or k in ("text_projection", "logit_scale", "attn_mask"):
            continue
        if m := re.match(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", k):
            i, kind = m.groups()
            for n, part in zip("qkv", v.chunk(3, 0)):
                out[f"text.encoder.layers.{i}.self_attn.{n}_proj.{kind}"] = part
        else:
            out["text." + rename(k, _TEXT_RENAMES)] = v
    out["text_proj.weight"] = sd["text_projection"].t()
    out["logit_scale"] = sd["logit_scale"]
    return out


def read(path: Path, arch: Optional[str] = None, quick_gelu: Optional[bool] = None,
         trust_torchscript: bool = False) -> tuple[ModelConfig, StateDict, Tokenizer]:
    """An OpenCLIP/OpenAI weights file as (config, clipkit state dict, the OpenAI BPE tokenizer)."""
    obj = read_safetensors(path) if path.suffix == ".safetensors" else safe_torch_load(path, trust_torchscript)
    sd = unwrap_state_dict(obj)
    cfg = config_from_openclip(sd, arch, quick_gelu)
    tok = tokenizer_for(cfg)
    return bind_tokenizer(cfg, tok), state_from_openclip(sd), tok
