"""Style-robust image augmentation for training on drawings (emoji, icons, clip art) on a plain background.

A model trained on a few art styles learns the styles; these changes keep the concept and vary the look:
a random background colour in place of the white one, colour jitter, grey-scale, blur and wider random
crops. Only images change, so a locked text tower's cached caption features stay valid. Every draw comes
from torch's RNG, so a seeded sample gets the same augmentation again (exact resume).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import default_collate
from torchvision.transforms import RandomResizedCrop


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


def _each(v: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, 1, 1]: one value per image of a batch."""
    return v.view(-1, 1, 1, 1)


def _chance(p: float) -> bool:
    return p > 0 and bool(torch.rand(()) < p)


def _uniform(low: float, high: float) -> float:
    return float(torch.empty(()).uniform_(low, high))


_GREY = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale


class StyleDraw(NamedTuple):
    """One sample's random choices (`StyleAugment.draw`); `default_collate` stacks a batch of them field by field."""

    mask: torch.Tensor  # [S, S] bool: the background to recolour (all False when it keeps its white)
    colour: torch.Tensor  # [3] the new background colour
    jitter: bool
    brightness: float
    contrast: float
    saturation: float
    hue: float  # a turn of the colour circle
    grey: bool
    blur: bool
    sigma: float
    top: int  # the crop box
    left: int
    height: int
    width: int


class StyleAugment:
    """uint8 [3, S, S] -> float [3, S, S] in [0, 1]: background colour, colour jitter, grey-scale, blur, crop.

    Two halves, so that a whole batch is augmented at once: `draw` takes one sample's random choices (under that
    sample's seeded RNG, in the loader's dataset), `apply` carries them out on a stacked batch (in the loader's
    collate). One sample at a time, the demo's batch of 64 took ~100 ms of one core.
    """

    def __init__(self, image_size: int, cfg: StyleAugmentConfig = StyleAugmentConfig()) -> None:
        self.size, self.cfg = image_size, cfg
        self._masks: dict[int, torch.Tensor] = {}  # background masks by cache row: a pure function of the image
        self._no_mask = torch.zeros(image_size, image_size, dtype=torch.bool)

    def draw(self, x: torch.Tensor, key: Optional[int] = None) -> StyleDraw:
        """One sample's choices, from torch's RNG; `key` memoises the background mask of an image that comes
        again (a cache row)."""
        cfg = self.cfg
        if x.shape[-2:] != (self.size, self.size):
            raise ValueError(f"StyleAugment({self.size}) takes [3, {self.size}, {self.size}] images, got {tuple(x.shape)}")
        mask, colour = self._no_mask, torch.ones(3)
        if _chance(cfg.background_p):
            mask, colour = self._mask(x, key), torch.rand(3)
        jitter, factors, hue = _chance(cfg.jitter_p), (1.0, 1.0, 1.0), 0.0
        if jitter:
            factors = tuple(_uniform(1 - r, 1 + r) for r in (cfg.brightness, cfg.contrast, cfg.saturation))
            hue = _uniform(-cfg.hue, cfg.hue) if cfg.hue > 0 else 0.0
        grey, blur = _chance(cfg.grayscale_p), _chance(cfg.blur_p)
        sigma = _uniform(*cfg.blur_sigma) if blur else 1.0
        box = RandomResizedCrop.get_params(x, list(cfg.crop_scale), list(cfg.crop_ratio))
        return StyleDraw(mask, colour, jitter, *factors, hue, grey, blur, sigma, *box)

    def _mask(self, x: torch.Tensor, key: Optional[int]) -> torch.Tensor:
        if key is None:
            return background_mask(x, self.cfg.background_min)
        if key not in self._masks:
            self._masks[key] = background_mask(x, self.cfg.background_min)
        return self._masks[key]

    def apply(self, x: torch.Tensor, d: StyleDraw) -> torch.Tensor:
        """uint8 [B, 3, S, S] and the stacked draws of its samples -> float [B, 3, S, S] in [0, 1]."""
        x = torch.where(d.mask[:, None], d.colour[:, :, None, None], x.float().div_(255))
        for chosen, change in ((d.jitter, self._jitter), (d.grey, _grey), (d.blur, _blur)):
            i = chosen.nonzero()[:, 0]  # only the images drawn for this change
            if len(i):
                x[i] = change(x[i], StyleDraw(*(v[i] for v in d)))
        boxes = torch.stack([d.top, d.left, d.height, d.width], 1)
        return _resized_crops(x, boxes, self.size).clamp_(0, 1)  # resampling can overshoot 1 by a rounding error

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """One image: `draw` then `apply` (the training loader does the two apart, a batch at a time)."""
        return self.apply(x[None], default_collate([self.draw(x)]))[0]

    def _jitter(self, x: torch.Tensor, d: StyleDraw) -> torch.Tensor:
        brightness, contrast, saturation = (_each(v.float()) for v in (d.brightness, d.contrast, d.saturation))
        x = x * brightness
        grey = (x * _GREY).sum(1, keepdim=True)
        mean = grey.mean((1, 2, 3), keepdim=True)
        x = (x - mean) * contrast + mean
        x = grey + (x - grey) * saturation
        if self.cfg.hue > 0:  # a small hue turn: rotate the chroma plane about the grey axis (YIQ)
            x = _turn_hue(x, d.hue)
        return x.clamp_(0, 1)


_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_RGB = torch.linalg.inv(_YIQ)


def _turn_hue(x: torch.Tensor, turn: torch.Tensor) -> torch.Tensor:
    """Rotate each image's hue by `turn` [B] of a full circle (in YIQ space: luma kept, chroma rotated)."""
    c, s = torch.cos(2 * torch.pi * turn).float(), torch.sin(2 * torch.pi * turn).float()  # turn: float64
    one, zero = torch.ones_like(c), torch.zeros_like(c)
    rot = torch.stack([torch.stack([one, zero, zero], -1), torch.stack([zero, c, -s], -1),
                       torch.stack([zero, s, c], -1)], -2)  # [B, 3, 3]
    return torch.einsum("bij,bjhw->bihw", _RGB @ rot @ _YIQ, x)


def _grey(x: torch.Tensor, d: StyleDraw) -> torch.Tensor:
    return (x * _GREY).sum(1, keepdim=True).expand_as(x)


def _blur(x: torch.Tensor, d: StyleDraw) -> torch.Tensor:
    """A 3x3 Gaussian blur of each [3, S, S] image of a batch with its own `d.sigma`, edges replicated."""
    b, c, h, w = x.shape
    sigma = d.sigma.float()
    k = torch.exp(-torch.tensor([-1.0, 0.0, 1.0]) ** 2 / (2 * sigma[:, None] ** 2))  # [B, 3]
    k = k[:, :, None] * k[:, None, :] / k.sum(1)[:, None, None] ** 2  # [B, 3, 3]
    weight = k[:, None].expand(b, c, 3, 3).reshape(b * c, 1, 3, 3)
    padded = torch.nn.functional.pad(x.reshape(1, b * c, h, w), (1, 1, 1, 1), mode="replicate")
    return torch.nn.functional.conv2d(padded, weight, groups=b * c).view(b, c, h, w)


def _resized_crops(x: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Crop box (top, left, height, width) of each image, resized to `size` x `size` bilinearly: torchvision's
    `resized_crop` values for crops no larger than the output, as two batched matmuls (rows, then columns)."""
    rows = _resampling(boxes[:, 0], boxes[:, 2], size, x.shape[2])  # [B, size, H]
    cols = _resampling(boxes[:, 1], boxes[:, 3], size, x.shape[3])  # [B, size, W]
    return rows[:, None] @ x @ cols[:, None].transpose(-1, -2)


def _resampling(start: torch.Tensor, length: torch.Tensor, size: int, source: int) -> torch.Tensor:
    """[B, size, source]: each output pixel's bilinear weights on the crop's source pixels, with half-pixel
    centres and edges clamped to the crop (as `interpolate(..., align_corners=False)`)."""
    first, last = start[:, None].double(), (start + length - 1)[:, None].double()
    pos = first + (torch.arange(size, dtype=torch.float64) + 0.5) / size * length[:, None] - 0.5
    pos = torch.minimum(torch.maximum(pos, first), last)
    lo = pos.floor()
    hi, frac = torch.minimum(lo + 1, last), (pos - lo).float()
    weights = torch.zeros(len(start), size, source)
    weights.scatter_add_(2, lo.long()[..., None], (1 - frac)[..., None])
    return weights.scatter_add_(2, hi.long()[..., None], frac[..., None])
