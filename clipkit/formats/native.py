"""The clipkit model directory: config.json + model.safetensors + tokenizer files + a sha256 manifest.

`save` writes it atomically; `read` turns it back into `(ModelConfig, state dict, tokenizer)`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors.torch import save_model

from ..errors import CheckpointError
from ..fileio import atomic_dir, verify_manifest, write_json_atomic, write_manifest
from ..model.clip import CLIPModel
from ..model.config import ModelConfig
from ..model.tokenizer import Tokenizer, load_tokenizer
from .layout import read_json
from .weights import PathLike, StateDict, check_finite, read_safetensors

FORMAT, FORMAT_VERSION = "clipkit", 1
WEIGHTS = "model.safetensors"


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


def read(path: Path) -> tuple[ModelConfig, StateDict, Tokenizer]:
    """A clipkit model directory as (config, state dict, tokenizer), after checking its manifest."""
    verify_manifest(path, CheckpointError)
    cfg_dict = read_json(path / "config.json")
    if cfg_dict.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: written by a newer clipkit (format {cfg_dict['format_version']}); upgrade clipkit")
    try:
        cfg = ModelConfig.from_dict(cfg_dict)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path / 'config.json'}: invalid clipkit model config ({e})") from None
    cfg.text.pretrained = None  # weights come from model.safetensors, never from the original directory
    return cfg, read_safetensors(path / WEIGHTS), load_tokenizer(path, cfg.text.context_length)
