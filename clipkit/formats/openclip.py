"""OpenCLIP and OpenAI ViT CLIP state dicts (`.pt`, `.bin`, `.safetensors`): read into clipkit's layout.

Shapes are read from the weights; the activation, head width and preprocessing come from the model name the
weights were trained as (`arch`, open_clip's naming: `ViT-B-32` is GELU, `ViT-B-32-quickgelu` QuickGELU), because
a state dict does not record them.
"""
from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import CheckpointError
from ..model.config import (CLIP_VIT, ModelConfig, PreprocessConfig, TextConfig, VisionConfig, clip_text_config,
                            get_preset, vision_kwargs)
from ..model.factory import bind_tokenizer, tokenizer_for
from ..model.tokenizer import Tokenizer
from .layout import RenameTable, rename
from .weights import StateDict, _is_torchscript, read_safetensors, safe_torch_load

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


def _shapes(sd: StateDict) -> dict[str, int]:
    """What the weights of a ViT CLIP say about its shape."""
    if "visual.conv1.weight" not in sd:
        raise CheckpointError("only ViT OpenCLIP/OpenAI checkpoints are supported (no visual.conv1.weight found)")
    conv = sd["visual.conv1.weight"]
    return {
        "width": conv.shape[0], "patch": conv.shape[-1],
        "image": conv.shape[-1] * round(math.sqrt(sd["visual.positional_embedding"].shape[0] - 1)),
        "layers": len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")}),
        "mlp": sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        "text_width": sd["ln_final.weight"].shape[0],
        "text_layers": len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")}),
        "text_mlp": sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        "context": sd["positional_embedding"].shape[0], "vocab": sd["token_embedding.weight"].shape[0],
        "embed_dim": sd["text_projection"].shape[1],
    }


def _shapes_of(cfg: ModelConfig) -> dict[str, int]:
    """The same shape fields for a clipkit config of a CLIP ViT."""
    v, t = cfg.vision.timm_kwargs, cfg.text.hf_config
    return {"width": v["embed_dim"], "patch": v["patch_size"], "image": v["img_size"], "layers": v["depth"],
            "mlp": int(v["embed_dim"] * v["mlp_ratio"]), "text_width": t["hidden_size"],
            "text_layers": t["num_hidden_layers"], "text_mlp": t["intermediate_size"],
            "context": t["max_position_embeddings"], "vocab": t["vocab_size"], "embed_dim": cfg.embed_dim}


def config_from_openclip(sd: StateDict, arch: Optional[str] = None, quick_gelu: Optional[bool] = None,
                         base: Optional[ModelConfig] = None) -> ModelConfig:
    """A ViT CLIP's config from an OpenCLIP/OpenAI state dict. The named model `arch` (or its config `base`)
    supplies what a state dict does not record, the activation, head width and preprocessing, and must have the
    weights' shapes; without one, heads are 64 wide and `quick_gelu` must say which activation the weights use.
    """
    shapes = _shapes(sd)
    if arch is not None or base is not None:
        base = base if base is not None else get_preset(arch)
        if base.vision.timm_name != CLIP_VIT or base.text.hf_config.get("model_type") != "clip_text_model":
            raise CheckpointError(f"{arch}: not a CLIP ViT model name; OpenCLIP weights need one such as ViT-B-32")
        theirs = _shapes_of(base)
        diff = [f"{k} {shapes[k]} vs {theirs[k]}" for k in shapes if shapes[k] != theirs[k]]
        if diff:
            raise CheckpointError(f"these weights are not a {arch or 'model of this config'} "
                                  f"(weights vs model: {', '.join(diff)}); pass the model name they were trained as")
    elif quick_gelu is None:
        raise CheckpointError("an OpenCLIP state dict does not record its activation: pass arch (e.g. ViT-B-32 for "
                              "LAION/DataComp weights, ViT-B-32-quickgelu for OpenAI weights) or quick_gelu")
    if quick_gelu is None:
        quick_gelu = base.vision.timm_kwargs.get("act_layer") == "quick_gelu"
    act = "quick_gelu" if quick_gelu else "gelu"
    head = base.vision.timm_kwargs["embed_dim"] // base.vision.timm_kwargs["num_heads"] if base else 64
    text_head = base.text.hf_config["hidden_size"] // base.text.hf_config["num_attention_heads"] if base else 64
    s, tw = shapes, shapes["text_width"]
    return ModelConfig(
        embed_dim=s["embed_dim"],
        vision=VisionConfig(CLIP_VIT, vision_kwargs(s["width"], s["layers"], s["width"] // head, s["mlp"],
                                                    s["image"], s["patch"], act)),
        text=TextConfig(hf_config=clip_text_config(tw, s["text_layers"], tw // text_head, s["context"], s["vocab"],
                                                   act, s["text_mlp"]),
                        pooling="eot", context_length=s["context"], eot_token_id=None),
        preprocess=dataclasses.replace(base.preprocess if base else PreprocessConfig(), image_size=s["image"]),
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


def read(path: Path, arch: Optional[str] = None, quick_gelu: Optional[bool] = None, trust_torchscript: bool = False,
         base: Optional[ModelConfig] = None) -> tuple[ModelConfig, StateDict, Tokenizer]:
    """An OpenCLIP/OpenAI weights file as (config, clipkit state dict, the OpenAI BPE tokenizer). OpenAI's own
    TorchScript archives use QuickGELU, so that is their activation when nothing else is said."""
    obj = read_safetensors(path) if path.suffix == ".safetensors" else safe_torch_load(path, trust_torchscript)
    sd = unwrap_state_dict(obj)
    if quick_gelu is None and arch is None and base is None and _is_torchscript(path):
        quick_gelu = True
    try:
        cfg = config_from_openclip(sd, arch, quick_gelu, base)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    tok = tokenizer_for(cfg)
    return bind_tokenizer(cfg, tok), state_from_openclip(sd), tok
