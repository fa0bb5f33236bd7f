"""The clipkit model directory: config.json + model.safetensors + tokenizer files + a sha256 manifest.

`save` writes it atomically; `read` turns it back into `(ModelConfig, state dict, tokenizer)` after checking
the manifest and that the config asks timm for nothing but an architecture (`check_file_config`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
from safetensors.torch import save_model

from ..errors import CheckpointError
from ..fileio import MANIFEST, atomic_dir, recover_dir, verify_manifest, write_json_atomic, write_manifest
from ..model.clip import CLIPModel
from ..model.config import ModelConfig, VisionConfig
from ..model.tokenizer import Tokenizer, load_tokenizer
from .layout import read_json
from .weights import PathLike, StateDict, check_finite, read_safetensors

FORMAT, FORMAT_VERSION = "clipkit", 1
WEIGHTS = "model.safetensors"
# `timm.create_model` keywords a model file may carry: architecture and regularisation only. Everything else is
# refused, above all what makes timm read or fetch weights (checkpoint_path, pretrained*, cache_dir).
TIMM_KWARGS = frozenset({
    "img_size", "patch_size", "in_chans", "embed_dim", "depth", "depths", "dims", "num_heads", "num_kv_heads",
    "head_dim", "mlp_ratio", "qkv_bias", "qkv_fused", "qk_norm", "proj_bias", "init_values", "class_token",
    "pos_embed", "no_embed_class", "reg_tokens", "num_reg_tokens", "pre_norm", "final_norm", "fc_norm",
    "global_pool", "dynamic_img_size", "dynamic_img_pad", "strict_img_size", "window_size", "act_layer",
    "norm_layer", "norm_eps", "weight_init", "fix_init", "drop_rate", "pos_drop_rate", "patch_drop_rate",
    "proj_drop_rate", "attn_drop_rate", "drop_path_rate", "drop_block_rate", "layers", "channels", "widths",
    "stem_type", "stem_width", "output_stride", "kernel_sizes", "ls_init_value", "layer_scale_init_value",
    "conv_mlp", "conv_bias", "use_grn", "head_norm_first", "head_hidden_size", "cardinality", "base_width",
    "avg_down", "channel_multiplier", "depth_multiplier", "swiglu_mlp", "scale_mlp", "use_rot_pos_emb",
    "use_abs_pos_emb", "ref_feat_shape",
})
_FETCHING = ("checkpoint_path", "pretrained", "cache_dir")  # prefixes: pretrained_cfg, pretrained_cfg_overlay, ...


def is_native(config: dict[str, Any]) -> bool:
    return config.get("format") == FORMAT


def check_tokenizer_matches(cfg: ModelConfig, tok: Tokenizer) -> None:
    """End-of-text pooling must pool at the tokenizer's end token, or text embeddings are silently wrong."""
    if cfg.text.pooling == "eot" and cfg.text.eot_token_id != tok.eot_token_id:
        raise CheckpointError(f"model config pools text at token id {cfg.text.eot_token_id} but the tokenizer ends "
                              f"text with id {tok.eot_token_id}; build the config with model.factory.bind_tokenizer")


def save(model: CLIPModel, tokenizer: Tokenizer, directory: PathLike) -> Path:
    """Write a self-describing model directory atomically (a crash leaves the old one intact)."""
    directory = Path(directory)
    check_finite(model)
    check_tokenizer_matches(model.config, tokenizer)
    with atomic_dir(directory) as tmp:
        save_model(model, str(tmp / WEIGHTS))
        tokenizer.save(tmp)
        config = {"format": FORMAT, "format_version": FORMAT_VERSION, **model.config.to_dict()}
        write_json_atomic(tmp / "config.json", config)
        write_manifest(tmp)
    return directory


def _is_plain_value(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str)) or \
        (isinstance(v, (list, tuple)) and all(_is_plain_value(x) for x in v))


def check_file_config(cfg: ModelConfig, where: str) -> None:
    """Refuse a config read from a file that would make timm load or fetch anything: a source-prefixed model name
    (`hf-hub:`, `local-dir:`), `vision.pretrained`, or `timm_kwargs` outside `TIMM_KWARGS`."""
    vision: VisionConfig = cfg.vision
    name = vision.timm_name
    if not isinstance(name, str) or ":" in name or not timm.is_model(name.rsplit("/", 1)[-1].split(".", 1)[0]):
        raise CheckpointError(f"{where}: vision.timm_name {name!r} is not a timm architecture name (source prefixes "
                              "such as hf-hub: or local-dir: make timm read files and are refused in model files)")
    if vision.pretrained:
        raise CheckpointError(f"{where}: vision.pretrained={vision.pretrained!r} refused: a model file's weights are "
                              "its own; it never asks timm to load or download others")
    if not isinstance(vision.timm_kwargs, dict):
        raise CheckpointError(f"{where}: vision.timm_kwargs must be an object of timm keywords")
    for key, value in vision.timm_kwargs.items():
        if key.startswith(_FETCHING):
            raise CheckpointError(f"{where}: vision.timm_kwargs.{key} refused: it makes timm read or download a "
                                  "file; a model file carries its weights itself")
        if key not in TIMM_KWARGS:
            raise CheckpointError(f"{where}: vision.timm_kwargs.{key} is not an architecture keyword clipkit "
                                  f"accepts from a model file (see clipkit.formats.native.TIMM_KWARGS)")
        if not _is_plain_value(value):
            raise CheckpointError(f"{where}: vision.timm_kwargs.{key}: {value!r} is not a number, string or list")


def read(path: Path, verify: bool = True) -> tuple[ModelConfig, StateDict, Tokenizer]:
    """A clipkit model directory as (config, state dict, tokenizer), after checking its manifest: every file in
    the directory must be listed and match. `verify=False` skips that, for directories made by hand."""
    recover_dir(path)
    if verify and not verify_manifest(path, CheckpointError, complete=True):
        raise CheckpointError(f"{path}: no {MANIFEST}; clipkit.save always writes one, so it was deleted or the "
                              "directory was made by hand. To load it without checksums, pass verify=False "
                              "(clipkit.load(path, verify=False)); to vouch for its files as they are, write one "
                              "with clipkit.fileio.write_manifest(path)")
    cfg_dict = read_json(path / "config.json")
    if cfg_dict.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: written by a newer clipkit (format {cfg_dict['format_version']}); upgrade clipkit")
    try:
        cfg = ModelConfig.from_dict(cfg_dict)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path / 'config.json'}: invalid clipkit model config ({e})") from None
    check_file_config(cfg, str(path / "config.json"))
    cfg.text.pretrained = None  # weights come from model.safetensors, never from the original directory
    return cfg, read_safetensors(path / WEIGHTS), load_tokenizer(path, cfg.text.context_length)
