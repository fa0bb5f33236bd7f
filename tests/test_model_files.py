"""Hostile and damaged clipkit model directories (issue 11, items 7, 8 and 11), with real files the test makes.

A model file may ask timm for an architecture only: never for a file to read or weights to fetch. A model
directory must match its manifest (or be opened with `verify=False`). A save killed half-way never loses it.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch

import clipkit
from clipkit.errors import CheckpointError
from clipkit.fileio import sha256_file, write_manifest
from clipkit.formats import native
from clipkit.model.config import get_preset, list_presets

from helpers import run_script

_OPENED: list[str] = []  # every file opened in this process while `_WATCHED` names it
_WATCHED: set[str] = set()


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _WATCHED and isinstance(args[0], (str, bytes, os.PathLike)):
        p = os.fsdecode(args[0])
        if any(p.startswith(w) for w in _WATCHED):
            _OPENED.append(p)


sys.addaudithook(_audit)  # audit hooks cannot be removed; it only records while a test watches a path


class _Payload:
    """Unpickled with full pickle, it creates the directory `sentinel`: proof that the file's code ran."""

    def __init__(self, sentinel: str) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return os.mkdir, (self.sentinel,)


@pytest.fixture
def planted(tmp_path, monkeypatch):
    """A real timm checkpoint of the tiny preset's image tower carrying a pickle payload, plus a timm
    `local-dir:` model directory; the test fails if anything opens them or timm's checkpoint loader runs."""
    root = tmp_path / "planted"
    root.mkdir()
    tower = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=64, patch_size=8,
                              depth=6)
    sentinel = tmp_path / "payload-ran"
    torch.save({"state_dict": tower.state_dict(), "x": _Payload(str(sentinel))}, root / "evil.pth")
    (root / "local").mkdir()
    (root / "local" / "config.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224",
                                                            "model_args": {"img_size": 64}}))
    shutil.copy(root / "evil.pth", root / "local" / "pytorch_model.bin")
    calls = []
    import timm.models._factory as factory

    monkeypatch.setattr(factory, "load_checkpoint", lambda *a, **k: calls.append(a) or pytest.fail("timm loaded a file"))
    _WATCHED.add(str(root))
    yield root
    _WATCHED.clear()
    opened, _OPENED[:] = list(_OPENED), []
    assert not opened, f"planted files were opened: {opened}"
    assert not calls and not sentinel.exists()


def _edit_config(d: Path, edit) -> None:
    """Change config.json and re-commit the manifest, as an attacker who can write the directory would."""
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg, d)
    (d / "config.json").write_text(json.dumps(cfg))
    write_manifest(d)


def _kw(**kw):
    return lambda c, d: c["vision"]["timm_kwargs"].update(kw)


HOSTILE = {
    "checkpoint_path": (lambda c, d: c["vision"]["timm_kwargs"].update(checkpoint_path=str(d / "evil.pth")),
                        "vision.timm_kwargs.checkpoint_path"),
    "pretrained_cfg_overlay": (lambda c, d: c["vision"]["timm_kwargs"].update(
        pretrained=True, pretrained_cfg_overlay={"file": str(d / "evil.pth")}), "vision.timm_kwargs.pretrained"),
    "pretrained_cfg": (lambda c, d: c["vision"]["timm_kwargs"].update(pretrained_cfg={"file": str(d / "evil.pth")}),
                       "vision.timm_kwargs.pretrained_cfg"),
    "cache_dir": (lambda c, d: c["vision"]["timm_kwargs"].update(cache_dir=str(d)), "vision.timm_kwargs.cache_dir"),
    "vision.pretrained": (lambda c, d: c["vision"].update(pretrained=str(d / "evil.pth")), "vision.pretrained"),
    "local-dir": (lambda c, d: c["vision"].update(timm_name=f"local-dir:{d / 'local'}"), "local-dir:"),
    "hf-hub": (lambda c, d: c["vision"].update(timm_name="hf-hub:timm/vit_tiny_patch16_224.augreg_in21k"), "hf-hub:"),
    "unlisted-kwarg": (lambda c, d: c["vision"]["timm_kwargs"].update(features_only=True),
                       "vision.timm_kwargs.features_only"),
    "dict-value": (lambda c, d: c["vision"]["timm_kwargs"].update(act_layer={"file": str(d / "evil.pth")}),
                   "vision.timm_kwargs.act_layer"),
}


@pytest.mark.parametrize("attack", list(HOSTILE))
def test_config_cannot_make_timm_read_files(attack, saved_tiny_dir, copy_dir, planted) -> None:
    """Before: `"checkpoint_path": "/anywhere.pth"` made timm load that file during clipkit.load, bypassing the
    safe loader (only timm's own weights_only default stopped the payload)."""
    d = copy_dir(saved_tiny_dir)
    edit, key = HOSTILE[attack]
    _edit_config(d, lambda c, _: edit(c, planted))
    with pytest.raises(CheckpointError, match="config.json") as e:
        clipkit.load(d)
    assert key in str(e.value), str(e.value)


def test_every_preset_and_converter_config_passes_the_check(hf_clip_dir) -> None:
    names = list_presets()
    assert {"tiny", "tiny-minilm"} <= set(names)
    for name in names:
        cfg = get_preset(name)
        cfg.vision.pretrained = None  # a preset may ask for weights when created; the file it saves never does
        native.check_file_config(cfg, name)
    cfg, _, _ = clipkit.formats.read_any(hf_clip_dir(257))  # the Hugging Face converter's timm keywords
    native.check_file_config(cfg, "hf")


def test_model_with_regularisation_keywords_round_trips(tmp_path) -> None:
    torch.manual_seed(0)
    model, tok = clipkit.create_model_and_tokenizer("tiny", drop_path_rate=0.1, qkv_bias=False)
    loaded, _, _ = clipkit.load(clipkit.save(model, tok, tmp_path / "m"))
    assert loaded.config.vision.timm_kwargs["drop_path_rate"] == 0.1
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.eval().encode_image(x), model.eval().encode_image(x))


def test_timm_weights_on_purpose_still_load_and_the_saved_model_reloads(tmp_path) -> None:
    """The check guards configs read from files: asking timm for weights in code (`image_pretrained`) still
    works, and the saved model records no weights source, so it loads through the check."""
    from safetensors.torch import save_file

    tower = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=64, patch_size=8,
                              depth=6)
    save_file(tower.state_dict(), str(tmp_path / "tower.safetensors"))
    model, tok = clipkit.create_model_and_tokenizer("tiny", image_pretrained=str(tmp_path / "tower.safetensors"))
    assert torch.equal(model.visual.pos_embed, tower.pos_embed)
    loaded, _, _ = clipkit.load(clipkit.save(model, tok, tmp_path / "m"))
    assert loaded.config.vision.pretrained is None and torch.equal(loaded.visual.pos_embed, tower.pos_embed)


# ---- manifests of model directories (item 8) ------------------------------------------------------

def test_model_dir_without_manifest_is_refused_unless_verify_false(saved_tiny_dir, copy_dir) -> None:
    """Before: a model directory with its manifest deleted loaded silently (indexes refused)."""
    d = copy_dir(saved_tiny_dir)
    (d / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=r"no manifest\.json.*verify=False"):
        clipkit.load(d)
    model, _, _ = clipkit.load(d, verify=False)  # a hand-made directory, on purpose
    ref, _, _ = clipkit.load(saved_tiny_dir)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))


def test_model_manifest_entries_outside_the_directory_are_refused(saved_tiny_dir, copy_dir, tmp_path) -> None:
    d = copy_dir(saved_tiny_dir)
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    good = json.loads((d / "manifest.json").read_text())
    bad = {**good["files"], "../secret.txt": {"bytes": secret.stat().st_size, "sha256": sha256_file(secret)}}
    (d / "manifest.json").write_text(json.dumps({"files": bad}))
    _WATCHED.add(str(secret))
    try:
        with pytest.raises(CheckpointError, match="not a plain file name"):
            clipkit.load(d)
        assert not _OPENED
    finally:
        _WATCHED.clear()
        _OPENED.clear()
    (d / "manifest.json").write_text(json.dumps({"files": {**good["files"], "config.json": 1}}))
    with pytest.raises(CheckpointError, match="malformed manifest"):
        clipkit.load(d)


def test_file_added_to_a_model_dir_after_saving_is_refused(saved_tiny_dir, copy_dir) -> None:
    """The tokenizer loader reads whatever tokenizer files are there: one added later must not slip in."""
    d = copy_dir(saved_tiny_dir)
    (d / "added_tokens.json").write_text(json.dumps({"<evil>": 9}))
    with pytest.raises(CheckpointError, match="added_tokens.json: not listed in the manifest"):
        clipkit.load(d)


# ---- a save killed half-way (item 11) -------------------------------------------------------------

_KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys
    import torch
    import clipkit
    from clipkit import fileio

    target = sys.argv[1]
    torch.manual_seed(1)
    model, tok = clipkit.create_model_and_tokenizer("tiny")
    fileio._exchange = lambda a, b: False  # the two-rename fallback (no renameat2) has the gap to kill in
    real = os.replace, os.rename
    def killing(fn):
        def rename(src, dst):
            fn(src, dst)
            if ".old-" in str(dst):
                os.kill(os.getpid(), signal.SIGKILL)
        return rename
    os.replace, os.rename = map(killing, real)
    clipkit.save(model, tok, target)
""")


def test_model_save_killed_between_renames_loads_and_saves_again(tiny_model_and_tokenizer, saved_tiny_dir,
                                                                  copy_dir) -> None:
    d = copy_dir(saved_tiny_dir)
    out = run_script(_KILLED_SAVE, d)
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    assert not d.exists() and [p for p in d.parent.iterdir() if ".old-" in p.name]
    loaded, _, _ = clipkit.load(d)  # restored from the copy moved aside
    model, tok = tiny_model_and_tokenizer
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    clipkit.save(model, tok, d)
    assert not [p for p in d.parent.iterdir() if ".old-" in p.name]
