"""Hugging Face CLIP directories (`transformers.CLIPModel.save_pretrained` output): read and write.

`read` turns a directory into `(ModelConfig, clipkit state dict, tokenizer)`; `save_hf` writes a clipkit
model back as a directory that `transformers.CLIPModel.from_pretrained` and `pipeline(...)` load.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import CheckpointError
from ..fileio import atomic_dir, write_json_atomic
from ..model.clip import CLIPModel
from ..model.config import (CLIP_VIT, OPENAI_MEAN, OPENAI_STD, ModelConfig, PreprocessConfig, TextConfig,
                            VisionConfig, vision_kwargs)
from ..model.factory import OPENAI_VOCAB, bind_tokenizer, tokenizer_for
from ..model.tokenizer import Tokenizer, load_tokenizer
from ..model.towers import refuse_remote_code
from .layout import RenameTable, read_json, rename
from .weights import PathLike, StateDict, load_state, read_weights_dir

WEIGHTS = "model.safetensors"
LEGACY_EOS = 2  # transformers reads eos_token_id == 2 as the legacy config: pool at the largest token id
_VISION_RENAMES: RenameTable = [  # HF CLIP vision names -> timm ViT names (q/k/v are fused separately)
    ("^embeddings.patch_embedding.weight", "patch_embed.proj.weight"),
    ("^pre_layrnorm.", "norm_pre."),
    ("^post_layernorm.", "norm."),
    ("^encoder.layers.", "blocks."),
    (".self_attn.out_proj.", ".attn.proj."),
    (".layer_norm1.", ".norm1."),
    (".layer_norm2.", ".norm2."),
]


def is_hf_clip(config: dict[str, Any]) -> bool:
    return config.get("model_type") == "clip"


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
        elif re.match(r"encoder\.layers\.\d+\.self_attn\.[kv]_proj\.", k) or k.startswith("embeddings.position_ids"):
            continue
        else:
            out[rename(k, _VISION_RENAMES)] = v
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
            out[prefix + rename(k, _VISION_RENAMES, reverse=True)] = v
    return out


def config_from_hf(hf: dict[str, Any], eot_token_id: Optional[int]) -> ModelConfig:
    """A clipkit ModelConfig equivalent to a transformers CLIPConfig dict."""
    v, t = hf["vision_config"], dict(hf["text_config"])
    t["model_type"] = "clip_text_model"
    if eot_token_id is None and t.get("eos_token_id") not in (None, LEGACY_EOS):
        eot_token_id = t["eos_token_id"]
    vk = vision_kwargs(v["hidden_size"], v["num_hidden_layers"], v["num_attention_heads"],
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


_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL's codes in preprocessor_config.json


def preprocess_from_hf(path: Path, image_size: int) -> PreprocessConfig:
    """The image preprocessing of a CLIPImageProcessor's preprocessor_config.json (defaults without one)."""
    file = path / "preprocessor_config.json"
    if not file.exists():
        return PreprocessConfig(image_size=image_size)
    pp = read_json(file)
    crop = pp.get("crop_size", image_size)
    crop = crop.get("height", image_size) if isinstance(crop, dict) else crop
    size = pp.get("size", crop)
    size = size.get("shortest_edge", crop) if isinstance(size, dict) else size
    if size != crop or pp.get("resample", 3) not in _RESAMPLE:
        raise CheckpointError(f"{file}: resize to {size} then crop {crop} (resample {pp.get('resample')}) is not a "
                              "preprocessing clipkit reproduces (it resizes the short side to the crop size)")
    return PreprocessConfig(image_size=int(crop), mean=tuple(pp.get("image_mean", OPENAI_MEAN)),
                            std=tuple(pp.get("image_std", OPENAI_STD)), interpolation=_RESAMPLE[pp.get("resample", 3)])


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).exists() for f in ("tokenizer.json", "vocab.json"))


def read_tokenizer(path: Path, hf_cfg: dict[str, Any]) -> Tokenizer:
    """The tokenizer of a Hugging Face CLIP directory: its own files, else OpenAI's BPE when the vocabulary is
    OpenAI CLIP's (what every such repository uses); anything else is an error, never a stand-in."""
    context = hf_cfg["text_config"].get("max_position_embeddings", 77)
    if _has_tokenizer(path):
        return load_tokenizer(path, context)
    vocab = hf_cfg["text_config"].get("vocab_size")
    if vocab != OPENAI_VOCAB:
        raise CheckpointError(f"{path}: no tokenizer files (tokenizer.json or vocab.json + merges.txt) and the "
                              f"vocabulary ({vocab} tokens) is not OpenAI CLIP's; "
                              "copy the tokenizer files of the model this one was trained with into the directory")
    return tokenizer_for(config_from_hf(hf_cfg, None))


def read(path: Path) -> tuple[ModelConfig, StateDict, Tokenizer]:
    """A Hugging Face CLIP directory as (config, clipkit state dict, tokenizer); remote code is refused."""
    hf_cfg = read_json(path / "config.json")
    refuse_remote_code(hf_cfg, str(path))
    sd = read_weights_dir(path)
    tok = read_tokenizer(path, hf_cfg)
    own = _has_tokenizer(path)  # its own tokenizer files: the config's token ids stay as they are
    cfg = config_from_hf(hf_cfg, tok.eot_token_id if own else None)
    cfg.preprocess = preprocess_from_hf(path, hf_cfg["vision_config"]["image_size"])
    return (cfg if own else bind_tokenizer(cfg, tok)), state_from_hf(sd), tok


# ---------------------------------------------------------------------------------------------- export


def hf_config_from(cfg: ModelConfig) -> dict[str, Any]:
    """A transformers CLIPConfig dict for a CLIP-shaped clipkit model; raises if towers are not CLIP-shaped."""
    vk, t = cfg.vision.timm_kwargs, cfg.text.hf_config
    if "clip" not in cfg.vision.timm_name or "vit" not in cfg.vision.timm_name:
        raise CheckpointError(f"export to Hugging Face CLIP needs a timm CLIP ViT image tower, not {cfg.vision.timm_name}")
    if t.get("model_type") != "clip_text_model" or cfg.text.pooling != "eot" or cfg.proj_bias:
        raise CheckpointError("export to Hugging Face CLIP needs a CLIP text transformer with end-of-text pooling")
    if cfg.text.eot_token_id == LEGACY_EOS:
        raise CheckpointError(
            "export to Hugging Face CLIP: the tokenizer's end-of-text id is 2, which transformers treats as the "
            "legacy config and pools at the largest token id instead; the exported text embeddings would differ"
        )
    from timm import create_model

    ref = create_model(cfg.vision.timm_name, pretrained=False, num_classes=0, **vk)
    vision = {
        "hidden_size": ref.embed_dim, "num_hidden_layers": len(ref.blocks),
        "num_attention_heads": ref.blocks[0].attn.num_heads, "intermediate_size": ref.blocks[0].mlp.fc1.out_features,
        "image_size": ref.patch_embed.img_size[0], "patch_size": ref.patch_embed.patch_size[0],
        "hidden_act": vk.get("act_layer", "gelu"), "layer_norm_eps": 1e-5,
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


def save_hf(model: CLIPModel, tokenizer: Tokenizer, directory: PathLike) -> Path:
    """Export a CLIP-shaped clipkit model as a `transformers.CLIPModel` directory (loads with from_pretrained)."""
    from transformers import CLIPConfig, CLIPImageProcessor
    from transformers import CLIPModel as HFCLIPModel

    hf = HFCLIPModel(CLIPConfig(**hf_config_from(model.config)))
    load_state(hf, {k: v.detach().cpu() for k, v in state_to_hf(model.state_dict()).items()})
    pre = model.config.preprocess
    size = pre.image_size
    resample = {v: k for k, v in _RESAMPLE.items()}[pre.interpolation]
    processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                   image_mean=list(pre.mean), image_std=list(pre.std), resample=resample)
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        hf.save_pretrained(str(tmp))
        tokenizer.save(tmp)
        _set_max_length(tmp / "tokenizer_config.json", tokenizer.context_length)
        processor.save_pretrained(str(tmp))
        check_hf_export(tmp, tokenizer, size)
    return directory


def _set_max_length(path: Path, context_length: int) -> None:
    """The exported tokenizer's `model_max_length` is the model's context (truncation=True then cuts there)."""
    if path.is_file():
        write_json_atomic(path, {**read_json(path), "model_max_length": context_length})


PROBES = ("a cat.", "Dog 7!")  # short: within any context length, so no truncation is compared


def check_hf_export(directory: Path, tokenizer: Tokenizer, image_size: int) -> None:
    """Load what `pipeline(..., model=directory)` loads and check it: without its tokenizer files transformers
    builds an empty 2-token tokenizer silently and every label scores the same, so a missing or different
    tokenizer, or a missing preprocessor, raises CheckpointError instead of exporting."""
    from transformers import AutoImageProcessor, AutoTokenizer

    try:
        hf_tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)
        processor = AutoImageProcessor.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{directory}: the exported tokenizer or preprocessor does not load ({e})") from None
    want = tokenizer(list(PROBES))
    for i, text in enumerate(PROBES):
        n = int(want["attention_mask"][i].sum())
        if hf_tok(text)["input_ids"] != want["input_ids"][i, :n].tolist():
            raise CheckpointError(f"{directory}: the exported tokenizer ({type(hf_tok).__name__}, {len(hf_tok)} tokens) "
                                  f"does not tokenize like the model's ({tokenizer!r}); nothing was exported")
    crop = getattr(processor, "crop_size", None) or {}
    if crop.get("height") != image_size or crop.get("width") != image_size:
        raise CheckpointError(f"{directory}: the exported preprocessor crops to {crop}, the model takes {image_size} px")
