"""Weight and config conversion between clipkit and Hugging Face CLIP / OpenCLIP (OpenAI) layouts.

clipkit's CLIP-shaped model is a timm CLIP ViT (`visual.*`) plus a transformers CLIPTextModel
(`text.*`), so the text side maps by prefix and the image side by a small rename table.
"""
from __future__ import annotations

import math
import re
from typing import Any, Optional

import torch
from timm.models.vision_transformer import _convert_openai_clip

from .config import ModelConfig, PreprocessConfig, TextConfig, VisionConfig, clip_text_config, get_preset
from .errors import CheckpointError

StateDict = dict[str, torch.Tensor]
CLIP_VIT = "vit_base_patch32_clip_224"  # timm entry point: pre-norm ViT with LayerNorm eps 1e-5

# HF CLIP vision names -> timm ViT names; "^" entries match only at the start of a key.
# (q/k/v are fused into qkv separately.)
_HF_VISION_RENAMES = [
    ("^embeddings.patch_embedding.weight", "patch_embed.proj.weight"),
    ("^pre_layrnorm.", "norm_pre."),
    ("^post_layernorm.", "norm."),
    ("^encoder.layers.", "blocks."),
    (".self_attn.out_proj.", ".attn.proj."),
    (".layer_norm1.", ".norm1."),
    (".layer_norm2.", ".norm2."),
]


def _rename(key: str, table: list[tuple[str, str]], reverse: bool = False) -> str:
    """Apply a rename table (or its inverse, in reverse order) to one key."""
    for a, b in reversed(table) if reverse else table:
        src, dst = (b, a) if reverse else (a, b)
        anchored = src.startswith("^") or dst.startswith("^")
        src, dst = src.lstrip("^"), dst.lstrip("^")
        if anchored:
            key = dst + key[len(src):] if key.startswith(src) else key
        else:
            key = key.replace(src, dst)
    return key


def hf_vision_to_timm(sd: StateDict, prefix: str = "vision_model.") -> StateDict:
    """HF CLIPVisionTransformer weights -> timm CLIP ViT weights (q, k, v fused into qkv)."""
    out: StateDict = {}
    for k, v in sd.items():
        if not k.startswith(prefix):
            continue
        k = k[len(prefix):]
        if k == "embeddings.class_embedding":
            out["cls_token"] = v.reshape(1, 1, -1)
        elif k == "embeddings.position_embedding.weight":
            out["pos_embed"] = v.unsqueeze(0)
        elif m := re.match(r"encoder\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", k):
            i, kind = m.groups()
            parts = [sd[f"{prefix}encoder.layers.{i}.self_attn.{n}_proj.{kind}"] for n in "qkv"]
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(parts, 0)
        elif re.match(r"encoder\.layers\.\d+\.self_attn\.[kv]_proj\.", k):
            continue
        elif k.startswith("embeddings.position_ids"):
            continue
        else:
            out[_rename(k, _HF_VISION_RENAMES)] = v
    return out


def timm_to_hf_vision(sd: StateDict, prefix: str = "vision_model.") -> StateDict:
    """The inverse of `hf_vision_to_timm`."""
    out: StateDict = {}
    for k, v in sd.items():
        if k == "cls_token":
            out[prefix + "embeddings.class_embedding"] = v.reshape(-1)
        elif k == "pos_embed":
            out[prefix + "embeddings.position_embedding.weight"] = v.squeeze(0)
        elif m := re.match(r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", k):
            i, kind = m.groups()
            for n, part in zip("qkv", v.chunk(3, 0)):
                out[f"{prefix}encoder.layers.{i}.self_attn.{n}_proj.{kind}"] = part.clone()
        else:
            out[prefix + _rename(k, _HF_VISION_RENAMES, reverse=True)] = v
    return out


def _vision_kwargs(width: int, layers: int, heads: int, mlp: int, image: int, patch: int, act: str) -> dict[str, Any]:
    return {
        "img_size": image, "patch_size": patch, "embed_dim": width, "depth": layers,
        "num_heads": heads, "mlp_ratio": mlp / width, "act_layer": act,
    }


def config_from_hf(hf: dict[str, Any], eot_token_id: Optional[int]) -> ModelConfig:
    """A clipkit ModelConfig equivalent to a transformers CLIPConfig dict."""
    v, t = hf["vision_config"], dict(hf["text_config"])
    t["model_type"] = "clip_text_model"
    if eot_token_id is None and t.get("eos_token_id") not in (None, 2):
        eot_token_id = t["eos_token_id"]  # eos 2 is transformers' legacy marker for argmax pooling
    vk = _vision_kwargs(v["hidden_size"], v["num_hidden_layers"], v["num_attention_heads"],
                        v["intermediate_size"], v["image_size"], v["patch_size"], v.get("hidden_act", "quick_gelu"))
    return ModelConfig(
        embed_dim=hf.get("projection_dim", 512),
        vision=VisionConfig(CLIP_VIT, vk),
        text=TextConfig(hf_config=t, pooling="eot", context_length=t.get("max_position_embeddings", 77),
                        eot_token_id=eot_token_id),
        preprocess=PreprocessConfig(image_size=v["image_size"]),
        init_logit_scale=hf.get("logit_scale_init_value", 2.6592),
    )


def state_from_hf(sd: StateDict) -> StateDict:
    """HF CLIPModel state dict -> clipkit CLIPModel state dict."""
    out = {"visual." + k: v for k, v in hf_vision_to_timm(sd).items()}
    for k, v in sd.items():
        if k.startswith("text_model.") and not k.endswith("position_ids"):
            out["text." + k[len("text_model."):]] = v
    out["visual_proj.weight"] = sd["visual_projection.weight"]
    out["text_proj.weight"] = sd["text_projection.weight"]
    out["logit_scale"] = sd["logit_scale"]
    return out


def hf_config_from(cfg: ModelConfig) -> dict[str, Any]:
    """A transformers CLIPConfig dict for a CLIP-shaped clipkit model; raises if towers are not CLIP-shaped."""
    vk, t = cfg.vision.timm_kwargs, cfg.text.hf_config
    if "clip" not in cfg.vision.timm_name or "vit" not in cfg.vision.timm_name:
        raise CheckpointError(f"export to Hugging Face CLIP needs a timm CLIP ViT image tower, not {cfg.vision.timm_name}")
    if t.get("model_type") != "clip_text_model" or cfg.text.pooling != "eot" or cfg.proj_bias:
        raise CheckpointError("export to Hugging Face CLIP needs a CLIP text transformer with end-of-text pooling")
    if cfg.text.eot_token_id == 2:  # transformers reads eos_token_id == 2 as legacy OpenAI: pool at the largest id
        raise CheckpointError(
            "export to Hugging Face CLIP: the tokenizer's end-of-text id is 2, which transformers treats as the "
            "legacy config and pools at the largest token id instead; the exported text embeddings would differ"
        )
    from timm import create_model

    ref = create_model(cfg.vision.timm_name, pretrained=False, num_classes=0, **vk)
    width = ref.embed_dim
    vision = {
        "hidden_size": width, "num_hidden_layers": len(ref.blocks), "num_attention_heads": ref.blocks[0].attn.num_heads,
        "intermediate_size": ref.blocks[0].mlp.fc1.out_features, "image_size": ref.patch_embed.img_size[0],
        "patch_size": ref.patch_embed.patch_size[0], "hidden_act": vk.get("act_layer", "gelu"), "layer_norm_eps": 1e-5,
    }
    return {"text_config": dict(t), "vision_config": vision, "projection_dim": cfg.embed_dim,
            "logit_scale_init_value": cfg.init_logit_scale}


def state_to_hf(sd: StateDict) -> StateDict:
    """clipkit CLIPModel state dict -> HF CLIPModel state dict (the inverse of `state_from_hf`)."""
    out = timm_to_hf_vision({k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")})
    out.update({"text_model." + k[len("text."):]: v for k, v in sd.items() if k.startswith("text.")})
    out["visual_projection.weight"] = sd["visual_proj.weight"]
    out["text_projection.weight"] = sd["text_proj.weight"]
    out["logit_scale"] = sd["logit_scale"]
    return out


# OpenCLIP / OpenAI text transformer names -> transformers CLIPTextModel names
_OPENCLIP_TEXT_RENAMES = [
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
    text = clip_text_config(tw, tlayers, tw // 64, ctx, vocab, act)
    return ModelConfig(
        embed_dim=sd["text_projection"].shape[1],
        vision=VisionConfig(CLIP_VIT, _vision_kwargs(width, layers, width // 64, mlp, image, patch, act)),
        text=TextConfig(hf_config=text, pooling="eot", context_length=ctx, eot_token_id=None),
        preprocess=PreprocessConfig(**{**vars(base.preprocess), "image_size": image}),
    )


def state_from_openclip(sd: StateDict, vision_model: torch.nn.Module) -> StateDict:
    """OpenCLIP/OpenAI ViT CLIP state dict -> clipkit CLIPModel state dict."""
    vis = _convert_openai_clip(sd, vision_model, prefix="visual.")
    out = {"visual." + k: v for k, v in vis.items() if not k.startswith("head.")}
    out["visual_proj.weight"] = vis["head.weight"]
    for k, v in sd.items():
        if k.startswith("visual.") or k in ("text_projection", "logit_scale", "attn_mask"):
            continue
        if m := re.match(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", k):
            i, kind = m.groups()
            for n, part in zip("qkv", v.chunk(3, 0)):
                out[f"text.encoder.layers.{i}.self_attn.{n}_proj.{kind}"] = part
        else:
            out["text." + _rename(k, _OPENCLIP_TEXT_RENAMES)] = v
    out["text_proj.weight"] = sd["text_projection"].t()
    out["logit_scale"] = sd["logit_scale"]
    return out
