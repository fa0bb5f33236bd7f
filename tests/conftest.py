"""Shared fixtures: tiny clipkit models, a tiny random Hugging Face CLIP directory, test images.

Everything here is random-initialised and built offline; nothing is downloaded.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch

import clipkit
from helpers import make_hf_clip, random_image, small_clip_tokenizer


@pytest.fixture(scope="session")
def hf_clip_dir(tmp_path_factory) -> Callable[[int], Path]:
    """`hf_clip_dir(eos_token_id)` -> a saved random HF CLIP directory (with tokenizer); built once per id.

    eos_token_id=2 is the legacy config (HF pools at argmax of the ids); 257 is the real end id.
    """
    cache: dict[int, Path] = {}

    def build(eos_token_id: int) -> Path:
        if eos_token_id not in cache:
            d = tmp_path_factory.mktemp(f"hf_clip_eos{eos_token_id}")
            make_hf_clip(eos_token_id).save_pretrained(str(d))
            small_clip_tokenizer().save_pretrained(str(d))
            cache[eos_token_id] = d
        return cache[eos_token_id]

    return build


@pytest.fixture(scope="session")
def tiny_model_and_tokenizer():
    """A random `tiny` preset model in eval mode. Read-only: tests that mutate it must build their own."""
    torch.manual_seed(0)
    model, tok = clipkit.create_model_and_tokenizer("tiny")
    return model.eval(), tok


@pytest.fixture(scope="session")
def saved_tiny_dir(tmp_path_factory, tiny_model_and_tokenizer) -> Path:
    """`clipkit.save` of the tiny model. Read-only: copy it (`copy_dir`) before damaging it."""
    model, tok = tiny_model_and_tokenizer
    return clipkit.save(model, tok, tmp_path_factory.mktemp("saved") / "tiny")


@pytest.fixture
def copy_dir(tmp_path) -> Callable[[Path], Path]:
    def copy(src: Path) -> Path:
        dst = tmp_path / f"copy_{src.name}"
        shutil.copytree(src, dst)
        return dst

    return copy


@pytest.fixture
def image_files(tmp_path) -> list[Path]:
    """Four small random PNG files of different sizes."""
    paths = []
    for i in range(4):
        p = tmp_path / f"img{i}.png"
        random_image(i, (40 + 8 * i, 48)).save(p)
        paths.append(p)
    return paths
