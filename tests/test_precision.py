"""precision="auto": the hardware decides (bf16 where the CPU multiplies it natively, fp32 elsewhere); overrides;
int8 opt-in; embeddings always leave as float32 unit rows."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import clipkit
from clipkit.model import precision as P
from clipkit.model.transforms import Preprocess

from helpers import random_image


@pytest.fixture
def bf16_cpu(monkeypatch):
    """Pretend this CPU has (True) or lacks (False) native bf16."""
    def set_to(value: bool) -> None:
        monkeypatch.setattr(P, "cpu_has_native_bf16", lambda: value)
    return set_to


def test_auto_follows_the_cpu(bf16_cpu) -> None:
    bf16_cpu(True)
    assert P.resolve_precision("auto", "cpu") == "bf16"
    assert P.inference_precision("auto", "cpu") == P.TowerPrecision(image="bf16", text="fp32")
    assert P.training_precision("auto", "cpu") == "bf16"
    bf16_cpu(False)
    assert P.resolve_precision("auto", "cpu") == "fp32"
    assert P.inference_precision("auto", "cpu") == P.TowerPrecision(image="fp32", text="fp32")
    assert P.training_precision("auto", torch.device("cpu")) == "fp32"


def test_hardware_summary_names_the_cpu_and_what_auto_chose(bf16_cpu, monkeypatch) -> None:
    """What the demo records beside its figures: they differ between bf16 and fp32 machines."""
    monkeypatch.setattr(P, "_cpuinfo_field", lambda *names: "Test CPU 9000" if "model name" in names else "")
    bf16_cpu(False)
    hw = P.hardware_summary("cpu")
    assert hw == {"device": "Test CPU 9000", "threads": torch.get_num_threads(), "native_bf16": False,
                  "train_precision": "fp32", "image_precision": "fp32", "text_precision": "fp32"}
    bf16_cpu(True)
    hw = P.hardware_summary(torch.device("cpu"))
    assert (hw["native_bf16"], hw["train_precision"], hw["image_precision"], hw["text_precision"]) == \
        (True, "bf16", "bf16", "fp32")
    monkeypatch.setattr(P, "_cpuinfo_field", lambda *names: "")  # no /proc/cpuinfo: the platform's word
    assert P.cpu_name()


def test_overrides_and_refusals(bf16_cpu) -> None:
    bf16_cpu(False)
    for name in ("fp32", "bf16", "fp16"):
        assert P.inference_precision(name, "cpu") == P.TowerPrecision(name, name)
    assert P.inference_precision("int8", "cpu") == P.TowerPrecision(image="int8", text="fp32")
    with pytest.raises(ValueError, match="precision must be one of"):
        P.resolve_precision("float16", "cpu")
    with pytest.raises(ValueError, match="CPU only"):
        P.resolve_precision("int8", "cuda")
    for name in ("fp16", "int8"):
        with pytest.raises(ValueError, match="training runs in fp32 or bf16"):
            P.training_precision(name, "cpu")


def test_detection_reads_torch_capabilities_then_cpuinfo(monkeypatch) -> None:
    caps = {"avx512_bf16": False, "amx_bf16": False, "avx2": True}
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: dict(caps), raising=False)
    P.cpu_has_native_bf16.cache_clear()
    try:
        assert P.cpu_has_native_bf16() is False
        caps["amx_bf16"] = True
        P.cpu_has_native_bf16.cache_clear()
        assert P.cpu_has_native_bf16() is True
        monkeypatch.delattr(torch.cpu, "get_capabilities")  # an older torch: the kernel's flags decide
        monkeypatch.setattr(P, "_proc_cpuinfo_flags", lambda: {"fpu", "avx2", "avx512_bf16"})
        P.cpu_has_native_bf16.cache_clear()
        assert P.cpu_has_native_bf16() is True
        monkeypatch.setattr(P, "_proc_cpuinfo_flags", lambda: {"fpu", "avx2", "avx512f"})
        P.cpu_has_native_bf16.cache_clear()
        assert P.cpu_has_native_bf16() is False
    finally:
        P.cpu_has_native_bf16.cache_clear()


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, tok = clipkit.create_model_and_tokenizer("tiny")
    return model.eval(), Preprocess(model.config.preprocess), tok


def _embedder(tiny, precision: str) -> clipkit.Embedder:
    model, preprocess, tok = tiny
    return clipkit.Embedder(model, preprocess=preprocess, tokenizer=tok, device="cpu", batch_size=4, progress=False,
                            precision=precision)


def _unit_float32(x: np.ndarray) -> None:
    assert x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)


IMAGES = [random_image(i, (40 + 4 * i, 36)) for i in range(6)]
TEXTS = ["a red apple", "two dogs in the snow", "a cat"]


def test_auto_runs_the_image_tower_in_bf16_where_native(tiny, bf16_cpu) -> None:
    bf16_cpu(True)
    auto, fp32, bf16 = (_embedder(tiny, p) for p in ("auto", "fp32", "bf16"))
    assert auto.precision == P.TowerPrecision("bf16", "fp32")
    img = {name: e.images(IMAGES) for name, e in (("auto", auto), ("fp32", fp32), ("bf16", bf16))}
    for x in img.values():
        _unit_float32(x)
    np.testing.assert_array_equal(img["auto"], img["bf16"])  # the same bf16 autocast
    assert np.abs(img["auto"] - img["fp32"]).max() > 1e-5  # it really ran in bf16...
    assert (img["auto"] * img["fp32"]).sum(1).min() > 0.999  # ...and stayed close to fp32
    txt = auto.texts(TEXTS)
    _unit_float32(txt)
    np.testing.assert_array_equal(txt, fp32.texts(TEXTS))  # auto keeps the text tower in fp32
    assert np.abs(bf16.texts(TEXTS) - txt).max() > 1e-5  # an explicit bf16 runs it in bf16
    bf16_cpu(False)
    np.testing.assert_array_equal(_embedder(tiny, "auto").images(IMAGES), img["fp32"])


def test_int8_quantises_a_copy_of_the_image_tower(tiny) -> None:
    model = tiny[0]
    e, fp32 = _embedder(tiny, "int8"), _embedder(tiny, "fp32")
    quantized = [type(m).__module__ for m in e.encoder.visual.modules() if "quantized" in type(m).__module__]
    assert quantized and e.encoder is not model
    assert all(type(m) is torch.nn.Linear for m in model.visual.modules() if "Linear" in type(m).__name__)
    got, want = e.images(IMAGES), fp32.images(IMAGES)
    _unit_float32(got)
    assert np.abs(got - want).max() > 1e-5 and (got * want).sum(1).min() > 0.99
    np.testing.assert_array_equal(e.texts(TEXTS), fp32.texts(TEXTS))  # the text tower stays fp32


def test_cli_precision_flag_reaches_the_embedder(tmp_path, saved_tiny_dir, monkeypatch) -> None:
    """`clipkit score --precision fp32|int8` changes the numbers it prints; a bad value is refused by argparse."""
    import pandas as pd

    from clipkit import cli

    for i, img in enumerate(IMAGES[:3]):
        img.save(tmp_path / f"im{i}.png")
    pd.DataFrame({"prompt": TEXTS, "image": [f"im{i}.png" for i in range(3)]}).to_csv(tmp_path / "p.csv", index=False)
    seen = []
    real = clipkit.Embedder.__init__

    def spy(self, *a, **kw):
        seen.append(kw.get("precision", "auto"))
        real(self, *a, **kw)
    monkeypatch.setattr(clipkit.Embedder, "__init__", spy)
    for name in ("fp32", "int8"):
        assert cli.main(["score", "--model", str(saved_tiny_dir), "--pairs", str(tmp_path / "p.csv"),
                         "--precision", name]) == 0
    assert seen == ["fp32", "int8"]
    with pytest.raises(SystemExit):
        cli.main(["score", "--model", str(saved_tiny_dir), "--pairs", str(tmp_path / "p.csv"), "--precision", "fp64"])


def test_cpu_bf16_training_runs_attention_on_the_math_backend() -> None:
    """CPU bf16 training autocasts and turns SDPA's flash kernel off (its bf16 backward is slow on CPU); fp32 and
    CUDA keep it; the flag comes back afterwards."""
    with P.training_autocast("bf16", "cpu"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert not torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
    assert torch.backends.cuda.flash_sdp_enabled() and not torch.is_autocast_enabled("cpu")
    with P.training_autocast("fp32", "cpu"):
        assert torch.backends.cuda.flash_sdp_enabled() and not torch.is_autocast_enabled("cpu")
    q = torch.randn(2, 3, 9, 16, requires_grad=True)
    with P.training_autocast("bf16", "cpu"):
        out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    out.float().sum().backward()
    reference = torch.nn.functional.scaled_dot_product_attention(*(q.detach(),) * 3)
    assert out.dtype == torch.bfloat16 and torch.allclose(out.float(), reference, atol=0.05)


def test_auto_keeps_batch_norm_image_towers_in_fp32(monkeypatch):
    """bf16 moved the EfficientNet demo model's neighbours too far (recall@10 0.935), the ViT's not (0.993)."""
    import timm

    from clipkit.model import precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    cnn = timm.create_model("tf_efficientnet_lite0", num_classes=0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=0)
    assert precision.inference_precision("auto", "cpu", vit) == precision.TowerPrecision("bf16", "fp32")
    assert precision.inference_precision("auto", "cpu", cnn) == precision.TowerPrecision("fp32", "fp32")
    assert precision.inference_precision("bf16", "cpu", cnn).image == "bf16"  # asked for by name: given
    assert precision.hardware_summary("cpu", cnn)["image_precision"] == "fp32"
