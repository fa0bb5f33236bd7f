"""Pretrained models by name, offline: a Hugging Face cache laid out in a temporary HF_HOME, random weights inside.

Each source is compared with the peer's own loader on the same cache (open_clip, transformers, timm): embeddings
within 1e-4. Nothing touches the network: `helpers.offline_hub` sets offline mode and fails any connection.
Names: open_clip's pretrained tags (`ViT-B-32` + `laion2b_s34b_b79k` is GELU, `openai` is QuickGELU; real
ViT-B-32 shapes, so those two are slow), `hf-hub:` transformers and open_clip repositories, timm towers with
timm's pretrained weights, and transformers text towers by hub name.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import clipkit
from clipkit.errors import CheckpointError, ClipkitError, UnsafeCheckpointError
from clipkit.model.config import minilm_dir

from helpers import hub_repo, make_hf_clip, offline_env, offline_hub, random_image, small_clip_tokenizer

TOL = 1e-4
CAPTIONS = ["a photo of a cat", "two dogs in the snow", "x"]
TINY_CLIP = "clipkit-test/tiny-clip"
SHARDED_CLIP = "clipkit-test/tiny-clip-sharded"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
TIMM_TEST = "test_vit.r160_in1k"  # timm's own test model: 0.3M parameters, pretrained weights on timm/


def oc_config(quick_gelu: bool) -> dict:
    """A small open_clip model config; vision heads 32 wide (not open_clip's default 64) to test the head width."""
    return {"embed_dim": 48, "quick_gelu": quick_gelu,
            "vision_cfg": {"layers": 2, "width": 128, "patch_size": 8, "image_size": 32, "head_width": 32},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2}}


def random_open_clip(cfg: dict, seed: int = 0) -> torch.nn.Module:
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    model = open_clip.CLIP(cfg["embed_dim"], CLIPVisionCfg(**cfg["vision_cfg"]), CLIPTextCfg(**cfg["text_cfg"]),
                           quick_gelu=cfg["quick_gelu"])
    with torch.no_grad():  # non-trivial norms and biases, so a dropped or swapped tensor shows up
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def save_weights(model: torch.nn.Module, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def files_of(directory: Path, drop: tuple[str, ...] = ()) -> dict:
    return {str(p.relative_to(directory)): p for p in directory.rglob("*") if p.is_file() and p.name not in drop}


PREPROCESS = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "interpolation": "bilinear", "resize_mode": "shortest"}


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory) -> Path:
    """One Hugging Face cache with every repository the tests read."""
    home, work = tmp_path_factory.mktemp("hf_home"), tmp_path_factory.mktemp("sources")
    from transformers import CLIPImageProcessor

    clip_dir = work / "tiny-clip"
    make_hf_clip(257).save_pretrained(str(clip_dir))
    small_clip_tokenizer().save_pretrained(str(clip_dir))
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=[0.5, 0.4, 0.3],
                       image_std=[0.2, 0.25, 0.3], resample=2).save_pretrained(str(clip_dir))
    hub_repo(home, TINY_CLIP, files_of(clip_dir))
    sharded = work / "tiny-clip-sharded"  # as big checkpoints come: model.safetensors.index.json + shards
    make_hf_clip(257).save_pretrained(str(sharded), max_shard_size="40KB")
    small_clip_tokenizer().save_pretrained(str(sharded))
    hub_repo(home, SHARDED_CLIP, files_of(sharded))
    hub_repo(home, "clipkit-test/no-weights", files_of(clip_dir, drop=("model.safetensors",)))
    remote = json.loads((clip_dir / "config.json").read_text())
    remote["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    hub_repo(home, "clipkit-test/remote-code", {"config.json": json.dumps(remote),
                                                "modeling_evil.py": "raise SystemExit('remote code ran')\n"})
    for quick in (False, True):
        weights = save_weights(random_open_clip(oc_config(quick)), work / f"oc-{quick}.safetensors")
        hub_repo(home, f"clipkit-test/tiny-oc-{'quickgelu' if quick else 'gelu'}", {
            "open_clip_model.safetensors": weights,
            "open_clip_config.json": json.dumps({"model_cfg": oc_config(quick), "preprocess_cfg": PREPROCESS})})
    tiny = work / "oc-False.safetensors"  # the wrong shape under real tags: must be refused, not loaded
    hub_repo(home, "laion/CLIP-ViT-B-32-laion2B-s34B-b79K", {"open_clip_model.safetensors": tiny})
    hub_repo(home, "timm/vit_base_patch32_clip_224.openai", {"open_clip_model.safetensors": tiny})
    import timm

    torch.manual_seed(2)
    tower = timm.create_model(TIMM_TEST)
    with torch.no_grad():
        for p in tower.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hub_repo(home, f"timm/{TIMM_TEST}", {"model.safetensors": save_weights(tower, work / "timm.safetensors")})
    hub_repo(home, MINILM, files_of(Path(minilm_dir())))
    return home


@pytest.fixture
def hub(hf_home, monkeypatch) -> Path:
    offline_hub(monkeypatch, hf_home)
    return hf_home


def pixels(size: int, n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg.strip(), msg
    return msg


# ---------------------------------------------------------------------------------------- hf-hub: repositories


def test_hf_hub_clip_repo_matches_transformers(hub) -> None:
    from transformers import AutoTokenizer, CLIPImageProcessor
    from transformers import CLIPModel as HFCLIPModel

    ref = HFCLIPModel.from_pretrained(TINY_CLIP).eval()  # transformers' own loader, same offline cache
    model, train_pre, val_pre = clipkit.create_model_and_transforms(f"hf-hub:{TINY_CLIP}")
    tok = clipkit.get_tokenizer(f"hf-hub:{TINY_CLIP}")
    x, tokens = pixels(32, 3), tok(CAPTIONS)
    assert torch.equal(tokens["input_ids"][0, :6], torch.tensor(AutoTokenizer.from_pretrained(TINY_CLIP)(CAPTIONS[0])["input_ids"][:6]))
    with torch.no_grad():
        hi = F.normalize(ref.get_image_features(pixel_values=x).pooler_output, dim=-1)
        ht = F.normalize(ref.get_text_features(**dict(tokens)).pooler_output, dim=-1)
        assert max_diff(model.encode_image(x), hi) <= TOL and max_diff(model.encode_text(tokens), ht) <= TOL
    pre = val_pre.cfg  # the repository's preprocessor_config.json, not the defaults
    assert (pre.image_size, pre.mean, pre.std, pre.interpolation) == (32, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), "bilinear")
    assert train_pre.train and not val_pre.train and not model.training
    img = random_image(0, (50, 40))
    theirs = CLIPImageProcessor.from_pretrained(TINY_CLIP)(images=img, return_tensors="pt")["pixel_values"][0]
    assert max_diff(val_pre(img), theirs) < 0.05  # transformers resizes in float, PIL in uint8: within rounding
    loaded, _, _ = clipkit.load(f"hf-hub:{TINY_CLIP}")
    assert loaded.fingerprint() == model.fingerprint()


def test_sharded_hf_clip_repo_loads_every_shard(hub, tmp_path) -> None:
    """A repository whose weights are model.safetensors.index.json + shards (ViT-bigG's are) loads, by hub name and
    from a directory, with the same weights as the whole file; a missing shard is a one-line error."""
    snapshot = next((hub / "hub" / f"models--{SHARDED_CLIP.replace('/', '--')}" / "snapshots").iterdir())
    assert len(list(snapshot.glob("model-*-of-*.safetensors"))) > 3 and not (snapshot / "model.safetensors").exists()
    whole = clipkit.load(f"hf-hub:{TINY_CLIP}")[0].state_dict()
    by_name = clipkit.load(f"hf-hub:{SHARDED_CLIP}")[0].state_dict()
    from_dir = clipkit.load(str(snapshot))[0].state_dict()
    assert whole.keys() == by_name.keys() == from_dir.keys()
    assert all(torch.equal(whole[k], by_name[k]) and torch.equal(whole[k], from_dir[k]) for k in whole)
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in snapshot.iterdir():
        if not f.name.startswith("model-00002-"):
            (broken / f.name).write_bytes(f.read_bytes())
    with pytest.raises(CheckpointError) as e:
        clipkit.load(str(broken))
    assert "model-00002-" in one_line(e) and "missing" in str(e.value)


@pytest.mark.parametrize("quick_gelu", [False, True], ids=["gelu", "quickgelu"])
def test_open_clip_hub_repo_matches_open_clip(hub, quick_gelu: bool) -> None:
    import open_clip

    name = f"hf-hub:clipkit-test/tiny-oc-{'quickgelu' if quick_gelu else 'gelu'}"
    ref, _, ref_val = open_clip.create_model_and_transforms(name)
    ref.eval()
    model, _, val_pre = clipkit.create_model_and_transforms(name)
    ids, ours = open_clip.get_tokenizer(name)(CAPTIONS), clipkit.get_tokenizer(name)(CAPTIONS)
    attended = ours["attention_mask"].bool()  # the same BPE; padding differs (open_clip 0, clipkit end-of-text)
    assert torch.equal(ids[attended], ours["input_ids"][attended]) and (ids[~attended] == 0).all()
    x = pixels(32)
    with torch.no_grad():
        assert max_diff(model.encode_image(x), ref.encode_image(x, normalize=True)) <= TOL
        assert max_diff(model.encode_text(ours), ref.encode_text(ids, normalize=True)) <= TOL
    assert model.config.vision.timm_kwargs["num_heads"] == 4  # 128 wide / head_width 32
    assert model.config.vision.timm_kwargs["act_layer"] == ("quick_gelu" if quick_gelu else "gelu")
    img = random_image(1, (60, 44))
    assert max_diff(val_pre(img), ref_val(img)) < 1e-5  # the repository's mean/std/bilinear, as open_clip applies them


def test_wrong_activation_is_visible(hub, tmp_path) -> None:
    """The negative control of the parity tests: the GELU weights read as QuickGELU miss the tolerance."""
    import open_clip

    ref = open_clip.create_model("hf-hub:clipkit-test/tiny-oc-gelu").eval()
    file = save_weights(ref, tmp_path / "gelu.safetensors")
    wrong, _, _ = clipkit.load(file, quick_gelu=True)
    with torch.no_grad():
        assert max_diff(wrong.encode_image(pixels(32)), ref.encode_image(pixels(32), normalize=True)) > 10 * TOL


# ---------------------------------------------------------------------------------------- towers by name


def test_timm_tower_with_timm_pretrained_weights(hub, tmp_path) -> None:
    import timm

    ref = timm.create_model(TIMM_TEST, pretrained=True, num_classes=0).eval()  # timm's own loader, same cache
    model = clipkit.create_model("tiny", image_tower=f"timm/{TIMM_TEST}").eval()
    pre = model.config.preprocess
    assert pre.image_size == 160 and pre.mean == (0.5, 0.5, 0.5) and pre.std == (0.5, 0.5, 0.5)
    x = pixels(160)
    with torch.no_grad():
        assert max_diff(model.visual(x), ref(x)) <= 1e-6
        assert max_diff(clipkit.create_model("tiny", image_tower=TIMM_TEST).visual.eval()(x), ref(x)) > 1e-2  # random
    assert model.config.vision.pretrained is None  # the weights are in the state dict now
    file = next((hub / "hub" / f"models--timm--{TIMM_TEST}" / "snapshots").glob("*/model.safetensors"))
    from_file = clipkit.create_model("tiny", image_tower=TIMM_TEST, image_pretrained=str(file)).eval()
    with torch.no_grad():
        assert max_diff(from_file.visual(x), ref(x)) <= 1e-6
    saved = clipkit.save(model, clipkit.get_tokenizer("tiny"), tmp_path / "m")
    from huggingface_hub import constants

    empty = tmp_path / "empty-cache"
    empty.mkdir()
    with pytest.MonkeyPatch.context() as m:
        m.setattr(constants, "HF_HUB_CACHE", str(empty))  # loading a saved model never asks timm for weights
        loaded, _, _ = clipkit.load(saved)
    with torch.no_grad():
        assert max_diff(loaded.visual.eval()(x), ref(x)) <= 1e-6


def test_hf_text_tower_by_hub_name(hub) -> None:
    from transformers import AutoModel, AutoTokenizer

    ref, ref_tok = AutoModel.from_pretrained(MINILM).eval(), AutoTokenizer.from_pretrained(MINILM)
    model, tok = clipkit.create_model_and_tokenizer("tiny", text_tower=f"hf-hub:{MINILM}")
    assert model.config.text.pretrained is None and model.config.text.hf_config["model_type"] == "bert"
    tokens, theirs = tok(CAPTIONS), ref_tok(CAPTIONS, padding="max_length", max_length=32, truncation=True,
                                            return_tensors="pt")
    assert torch.equal(tokens["input_ids"], theirs["input_ids"])
    with torch.no_grad():
        hidden = ref(**theirs).last_hidden_state
        mask = theirs["attention_mask"].unsqueeze(-1).float()
        mean = (hidden * mask).sum(1) / mask.sum(1)  # sentence-transformers' mean pooling
        assert max_diff(model.eval().text_pooled(tokens), mean) <= TOL


# ---------------------------------------------------------------------------------------- one-line errors


def test_missing_names_are_one_line_errors(hub) -> None:
    with pytest.raises(ClipkitError) as e:
        clipkit.create_model("ViT-B-32", pretrained="laion2b_no_such_tag")
    assert "laion2b_s34b_b79k" in one_line(e) and "available" in str(e.value)
    with pytest.raises(ClipkitError) as e:
        clipkit.create_model("ViT-Q-99", pretrained="openai")
    assert "ViT-B-32" in one_line(e)
    with pytest.raises(ClipkitError) as e:
        clipkit.load("ViT-B-32")
    assert "ViT-B-32:TAG" in one_line(e) and "laion2b_s34b_b79k" in str(e.value)
    with pytest.raises(CheckpointError) as e:
        clipkit.load("hf-hub:nobody/nothing")
    assert "offline" in one_line(e) and "hf download nobody/nothing" in str(e.value)


def test_missing_file_in_the_cache_offline_says_what_to_download(hub) -> None:
    tok = clipkit.get_tokenizer("hf-hub:clipkit-test/no-weights")  # the tokenizer needs no weights
    assert tok(["a cat"]).shape == (1, 16)
    with pytest.raises(CheckpointError) as e:
        clipkit.create_model("hf-hub:clipkit-test/no-weights")
    msg = one_line(e)
    assert "model.safetensors" in msg and "HF_HUB_OFFLINE=1" in msg and "hf download clipkit-test/no-weights" in msg


def test_open_clip_tags_resolve_to_their_repositories(hub) -> None:
    """Fast: the table lookup, without ViT-B-32-sized weights. A tag whose cache holds another model's weights is
    refused by shape; a tag not in the cache names the repository and file to download."""
    with pytest.raises(CheckpointError) as e:
        clipkit.create_model("ViT-B-32", pretrained="laion2b_s34b_b79k")
    assert "not a ViT-B-32" in one_line(e) and "layers 2 vs 12" in str(e.value)
    with pytest.raises(CheckpointError) as e:
        clipkit.create_model("ViT-B-16", pretrained="laion2b_s34b_b88k")
    assert "hf download laion/CLIP-ViT-B-16-laion2B-s34B-b88K open_clip_model.safetensors" in one_line(e)
    with pytest.raises(ClipkitError) as e:  # openai weights are QuickGELU: GELU would change every embedding
        clipkit.create_model("ViT-B-32", pretrained="openai", quick_gelu=False)
    assert "QuickGELU" in one_line(e)


def test_remote_code_repo_is_refused_before_any_weights(hub) -> None:
    for call in (lambda: clipkit.load("hf-hub:clipkit-test/remote-code"),
                 lambda: clipkit.create_model("tiny", text_tower="hf-hub:clipkit-test/remote-code")):
        with pytest.raises(UnsafeCheckpointError) as e:  # the repo has no weights: refused on config.json alone
            call()
        assert "auto_map" in one_line(e) and "clipkit-test/remote-code" in str(e.value)


def test_list_pretrained_is_open_clips_table_for_the_models_clipkit_builds() -> None:
    import open_clip

    pairs = clipkit.list_pretrained()
    assert {("ViT-B-32", "laion2b_s34b_b79k"), ("ViT-B-32", "openai"), ("ViT-B-32-quickgelu", "openai"),
            ("ViT-L-14", "openai")} <= set(pairs)
    assert set(pairs) <= set(open_clip.list_pretrained()) and not any(m.startswith("RN") for m, _ in pairs)
    assert {m for m, _ in pairs} <= set(clipkit.list_presets())


# ---------------------------------------------------------------------------------------- the CLI, for real


def test_cli_train_from_a_hub_name_with_partial_locking_offline(hub, tmp_path) -> None:
    """`clipkit train` in a fresh process with HF_HOME and HF_HUB_OFFLINE=1 set the way a user sets them. The
    model has 2 blocks per tower: `--lock-image-unlocked-groups 2` trains [last block + final norm] and the
    projection (open_clip's groups); `--lock-text-unlocked-layers 1` trains only the text projection."""
    data = tmp_path / "data"
    data.mkdir()
    rows = []
    for i, (colour, shape) in enumerate([(c, s) for c in ("red", "blue", "green") for s in ("circle", "square")]):
        random_image(i, (40, 40)).save(data / f"{i}.png")
        rows.append(f"{i}.png,a {colour} {shape},{shape}")
    (data / "pairs.csv").write_text("image,caption,label\n" + "\n".join(rows) + "\n")
    run, name = tmp_path / "run", "hf-hub:clipkit-test/tiny-oc-gelu"
    cmd = [sys.executable, "-m", "clipkit.cli", "train", "--model", name,
           "--train-data", str(data / "pairs.csv"), "--val-data", str(data / "pairs.csv"), "--output", str(run),
           "--lock-image-unlocked-groups", "2", "--lock-text-unlocked-layers", "1", "--lr-layer-decay", "0.7",
           "--proj-lr", "1e-3", "--wise-ft", "0.5", "--reference-data", str(data / "pairs.csv"),
           "--batch-size", "3", "--max-steps", "2", "--warmup-steps", "1", "--lr", "1e-3", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=offline_env(hub))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "WiSE-FT" in proc.stdout and "| 0.5 |" in proc.stdout and (run / "wise_ft.png").exists()
    start = clipkit.load(name)[0].state_dict()
    tuned = clipkit.load(run / "model")[0].state_dict()
    changed = {k for k in start if not torch.equal(start[k], tuned[k])}
    assert not {k for k in changed if k.startswith(("visual.blocks.0.", "visual.patch_embed", "text."))}
    assert {"visual.blocks.1.attn.qkv.weight", "visual.norm.weight", "visual_proj.weight", "text_proj.weight"} <= changed


# ---------------------------------------------------------------------------------------- real ViT-B-32 shapes


def vit_b_32_cache(home: Path, work: Path, tag: str) -> torch.nn.Module:
    """A random open_clip model of the architecture `tag` was trained as, saved where open_clip's table puts the
    tag's weights on the hub (laion/... GELU; timm/...openai QuickGELU)."""
    import open_clip

    name, repo = {"laion2b_s34b_b79k": ("ViT-B-32", "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"),
                  "openai": ("ViT-B-32-quickgelu", "timm/vit_base_patch32_clip_224.openai")}[tag]
    torch.manual_seed(0)
    model = open_clip.create_model(name).eval()  # random: no `pretrained`
    hub_repo(home, repo, {"open_clip_model.safetensors": save_weights(model, work / "w.safetensors")})
    return model


@pytest.mark.slow
@pytest.mark.parametrize("tag", ["laion2b_s34b_b79k", "openai"])
def test_vit_b_32_tags_match_open_clip(tmp_path, monkeypatch, tag: str) -> None:
    """`create_model_and_transforms("ViT-B-32", pretrained=tag)` against open_clip's own loader on the same cache:
    laion2b_s34b_b79k is GELU; openai is QuickGELU (open_clip builds it right as ViT-B-32-quickgelu, and only
    warns when asked for ViT-B-32: its GELU embeddings are visibly off)."""
    import open_clip

    home = tmp_path / "hf_home"
    vit_b_32_cache(home, tmp_path, tag)
    offline_hub(monkeypatch, home)
    ref_name = "ViT-B-32" if tag != "openai" else "ViT-B-32-quickgelu"
    ref, _, ref_val = open_clip.create_model_and_transforms(ref_name, pretrained=tag)
    ref.eval()
    model, _, val = clipkit.create_model_and_transforms("ViT-B-32", pretrained=tag)
    assert model.config.vision.timm_kwargs["act_layer"] == ("quick_gelu" if tag == "openai" else "gelu")
    tok, ids = clipkit.get_tokenizer("ViT-B-32"), open_clip.get_tokenizer("ViT-B-32")(CAPTIONS)
    img = random_image(3, (300, 260))
    x = ref_val(img)[None]
    assert max_diff(val(img)[None], x) < 1e-5  # the tag's preprocessing, as open_clip applies it
    with torch.no_grad():
        ri, rt = ref.encode_image(x, normalize=True), ref.encode_text(ids, normalize=True)
        assert max_diff(model.encode_image(x), ri) <= TOL and max_diff(model.encode_text(tok(CAPTIONS)), rt) <= TOL
        if tag == "openai":
            with pytest.warns(UserWarning, match="QuickGELU mismatch"):
                gelu = open_clip.create_model("ViT-B-32", pretrained="openai").eval()
            assert max_diff(gelu.encode_image(x, normalize=True), ri) > 5 * TOL  # ~1e-3 on random weights


@pytest.mark.slow
def test_cli_train_vit_b_32_laion_with_locking(tmp_path) -> None:
    """The issue's command line, offline, on random ViT-B-32 weights in the laion2b_s34b_b79k repository."""
    home = tmp_path / "hf_home"
    start = vit_b_32_cache(home, tmp_path, "laion2b_s34b_b79k")
    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        random_image(i, (64, 48)).save(data / f"{i}.png")
    (data / "pairs.csv").write_text("image,caption\n" + "".join(f"{i}.png,picture number {i}\n" for i in range(4)))
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "clipkit.cli", "train", "--model", "ViT-B-32", "--pretrained", "laion2b_s34b_b79k",
           "--train-data", str(data / "pairs.csv"), "--lock-image-unlocked-groups", "2", "--lock-text",
           "--output", str(run), "--batch-size", "2", "--max-steps", "1", "--warmup-steps", "1", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=offline_env(home))
    assert proc.returncode == 0, proc.stderr[-3000:]
    from clipkit.formats.openclip import state_from_openclip

    before, after = state_from_openclip(start.state_dict()), clipkit.load(run / "model")[0].state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert "visual.blocks.11.mlp.fc1.weight" in changed and "visual_proj.weight" in changed
    assert not {k for k in changed if k.startswith(("visual.blocks.10.", "visual.patch_embed", "text."))}
