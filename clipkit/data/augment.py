"""Style-robust image augmentation for training on drawings (emoji, icons, clip art) on a plain background.

A model trained on a few art styles learns the styles; these changes keep the concept and vary the look:
a random background colour in place of the white one, colour jitter, grey-scale, blur and wider random
crops. Only images change, so a locked text tower's cached caption features stay valid. Every draw comes
from torch's RNG, so a seeded sample gets the same augmentation again (exact resume).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from torchvision.transforms import v2 as T


@dataclass(frozen=True)
class StyleAugmentConfig:
    """Probabilities and ranges of each change; the defaults are the emoji demo's measured recipe."""

    crop_scale: tuple[float, float] = (0.5, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    background_p: float = 0.5  # replace the background (white pixels joined to the border) with a random colour
    background_min: int = 245  # a pixel at least this bright in every channel counts as white
    jitter_p: float = 0.8
    brightness: float = 0.3
    contrast: float = 0.3
    saturation: float = 0.4
    hue: float = 0.02  # small: a hue shift turns a red heart into another emoji
    grayscale_p: float = 0.1
    blur_p: float = 0.1
    blur_sigma: tuple[float, float] = (0.3, 1.0)

    def __post_init__(self) -> None:
        for name in ("background_p", "jitter_p", "grayscale_p", "blur_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")
        if not 0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0:
            raise ValueError(f"crop_scale must be 0 < low <= high <= 1, got {self.crop_scale}")


def background_mask(x: torch.Tensor, min_value: int = 245) -> torch.Tensor:
    """[S, S] bool: the white pixels of a uint8 [3, S, S] image that are joined to its border (4-neighbours),
    i.e. the background around a drawing; white inside the drawing (eyes, teeth) is not joined and stays."""
    white = (x >= min_value).all(dim=0).numpy()
    labels, _ = ndimage.label(white)
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    return torch.from_numpy(np.isin(labels, edge[edge > 0]))


def _chance(p: float) -> bool:
    return p > 0 and bool(torch.rand(()) < p)


def _uniform(low: float, high: float) -> float:
    return float(torch.empty(()).uniform_(low, high))


_GREY = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale


class StyleAugment:
    """uint8 [3, S, S] -> float [3, S, S] in [0, 1]: background colour, colour jitter, grey-scale, blur, crop.

    Written as a few float tensor operations (about 1 ms a sample on one core; torchvision's uint8 colour
    jitter with hue took 2 ms alone), because it runs on the training process's own cores.
    """

    def __init__(self, image_size: int, cfg: StyleAugmentConfig = StyleAugmentConfig()) -> None:
        self.cfg = cfg
        self.crop = T.RandomResizedCrop(image_size, scale=cfg.crop_scale, ratio=cfg.crop_ratio, antialias=True)

    def _jitter(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        x = x * _uniform(1 - cfg.brightness, 1 + cfg.brightness)
        grey = (x * _GREY).sum(0, keepdim=True)
        x = (x - grey.mean()) * _uniform(1 - cfg.contrast, 1 + cfg.contrast) + grey.mean()
        x = grey + (x - grey) * _uniform(1 - cfg.saturation, 1 + cfg.saturation)
        if cfg.hue > 0:  # a small hue turn: rotate the chroma plane about the grey axis (YIQ)
            x = _turn_hue(x, _uniform(-cfg.hue, cfg.hue))
        return x.clamp_(0, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        mask = background_mask(x, cfg.background_min) if _chance(cfg.background_p) else None
        x = x.float().div_(255)
        if mask is not None:
            x = torch.where(mask, torch.rand(3, 1, 1), x)
        if _chance(cfg.jitter_p):
            x = self._jitter(x)
        if _chance(cfg.grayscale_p):
            x = (x * _GREY).sum(0, keepdim=True).expand(3, -1, -1)
        if _chance(cfg.blur_p):
            x = _blur(x, _uniform(*cfg.blur_sigma))
        return self.crop(x).clamp(0, 1)  # resampling can overshoot 1 by a rounding error


_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_RGB = torch.linalg.inv(_YIQ)


def _turn_hue(x: torch.Tensor, turn: float) -> torch.Tensor:
    """Rotate hue by `turn` of a full circle (in YIQ space: luma kept, chroma rotated)."""
    c, s = float(np.cos(2 * np.pi * turn)), float(np.sin(2 * np.pi * turn))
    rot = torch.tensor([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
    m = _RGB @ rot @ _YIQ
    return torch.einsum("ij,jhw->ihw", m, x)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """A 3x3 Gaussian blur of a [3, S, S] image, edges replicated."""
    k = torch.exp(-torch.tensor([-1.0, 0.0, 1.0]) ** 2 / (2 * sigma ** 2))
    k = (k[:, None] * k[None, :] / k.sum() ** 2).expand(3, 1, 3, 3)
    padded = torch.nn.functional.pad(x[None], (1, 1, 1, 1), mode="replicate")
    return torch.nn.functional.conv2d(padded, k, groups=3)[0]
