"""Style-robust augmentation: the background found and recoloured, the drawing kept, seeded draws, the hook in
the decoded-image dataset (images change, captions and so the locked-text cache do not), the trainer option."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageDraw
from torch.utils.data import default_collate
from torchvision.transforms.v2 import functional as TF

from clipkit.data.augment import StyleAugment, StyleAugmentConfig, background_mask
from clipkit.data.cache import CachedPairDataset, DecodedCache
from clipkit.errors import ClipkitError
from clipkit.model.config import PreprocessConfig
from clipkit.train import TrainConfig

OFF = {"background_p": 0.0, "jitter_p": 0.0, "grayscale_p": 0.0, "blur_p": 0.0, "crop_scale": (1.0, 1.0),
       "crop_ratio": (1.0, 1.0)}


def _face(size: int = 32) -> torch.Tensor:
    """uint8 [3, S, S]: a red disc with a white eye inside it, on white."""
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    draw.ellipse((4, 4, size - 5, size - 5), fill=(220, 30, 30))
    draw.ellipse((12, 12, 17, 17), fill="white")
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def test_background_mask_is_the_white_joined_to_the_border() -> None:
    x = _face()
    mask = background_mask(x)
    assert mask[0, 0] and mask[-1, -1] and mask[0, 16]  # corners and edge
    assert not mask[16, 16 - 8] and not mask[14, 14]  # the disc, and the white eye inside it
    assert mask.sum() == ((x >= 245).all(0) & ~_inside_disc(x)).sum()


def _inside_disc(x: torch.Tensor) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(x.shape[1]), torch.arange(x.shape[2]), indexing="ij")
    return (yy - 15.5) ** 2 + (xx - 15.5) ** 2 < 12 ** 2


def test_background_colour_replaces_only_the_background() -> None:
    x = _face()
    aug = StyleAugment(32, StyleAugmentConfig(**{**OFF, "background_p": 1.0}))
    torch.manual_seed(0)
    y = (aug(x) * 255).round().to(torch.uint8)
    mask = background_mask(x)
    colours = y.permute(1, 2, 0)[mask].unique(dim=0)
    assert len(colours) == 1 and not (colours == 255).all()  # one new colour, not white
    assert torch.equal(y[:, ~mask], x[:, ~mask])  # the drawing, white eye included, is untouched


def test_every_change_can_be_switched_off_and_output_is_float() -> None:
    x = _face()
    y = StyleAugment(32, StyleAugmentConfig(**OFF))(x)
    assert y.dtype == torch.float32 and y.shape == (3, 32, 32)
    assert torch.allclose(y, x.float() / 255)
    grey = StyleAugment(32, StyleAugmentConfig(**{**OFF, "grayscale_p": 1.0}))(x)
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])


def test_seeded_draws_repeat_and_differ() -> None:
    x, aug = _face(), StyleAugment(32)
    outs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        outs.append(aug(x))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    assert all(0.0 <= float(o.min()) and float(o.max()) <= 1.0 for o in outs)


def test_small_hue_keeps_grey_grey_and_red_red() -> None:
    x = _face()
    aug = StyleAugment(32, StyleAugmentConfig(**{**OFF, "jitter_p": 1.0, "brightness": 0.0, "contrast": 0.0,
                                                 "saturation": 0.0, "hue": 0.02}))
    torch.manual_seed(3)
    y = aug(x)
    assert torch.allclose(y[:, 0, 0], y[:, 0, 0].mean().expand(3), atol=1e-5)  # white stays neutral
    r, g, b = y[:, 16, 8]
    assert r > 0.6 and g < 0.35 and b < 0.35  # a red disc stays red under a hue turn of at most 2 %


@pytest.mark.parametrize("bad", [{"background_p": 1.5}, {"grayscale_p": -0.1}, {"crop_scale": (0.0, 1.0)}])
def test_bad_config(bad) -> None:
    with pytest.raises(ValueError):
        StyleAugmentConfig(**bad)


def test_cached_dataset_augments_images_and_never_captions(tmp_path) -> None:
    from clipkit.model.tokenizer import byte_level_tokenizer

    path = tmp_path / "face.png"
    Image.fromarray(_face().permute(1, 2, 0).numpy()).save(path)
    table = pd.DataFrame({"image": [str(path)] * 2, "caption": ["red face", "a red face emoji"]})
    cfg = PreprocessConfig(image_size=32)
    cache = DecodedCache.build(table, cfg, tmp_path / "cache", num_workers=0, progress=False)
    tok = byte_level_tokenizer(16)
    plain = CachedPairDataset(table, cache, tok, cfg)
    styled = CachedPairDataset(table, cache, tok, cfg, train=True, style=StyleAugment(32))
    torch.manual_seed(0)
    a = styled.collate([styled[1]])
    torch.manual_seed(0)
    b = styled.collate([styled[1]])
    p = plain.collate([plain[1]])
    assert torch.equal(a["pixels"], b["pixels"]) and not torch.allclose(a["pixels"], p["pixels"])
    assert torch.equal(a["input_ids"], p["input_ids"])  # the caption is untouched: cached text stays valid
    assert a["pixels"].shape == p["pixels"].shape == (1, 3, 32, 32) and a["pixels"].dtype == torch.float32


def _images(n: int, size: int = 32) -> list[torch.Tensor]:
    """Faces of different sizes and colours, so every image has its own background."""
    out = []
    for k in range(n):
        img = Image.new("RGB", (size, size), "white")
        draw = ImageDraw.Draw(img)
        draw.ellipse((2 + k % 5, 3, size - 3 - k % 4, size - 2 - k % 3), fill=(40 * k % 256, 200 - 15 * k, 90))
        draw.rectangle((10, 10, 14 + k % 6, 13), fill="white")
        out.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1))
    return out


def test_a_batch_gets_what_each_image_gets_alone() -> None:
    """`apply` on a stacked batch equals `__call__` image by image under the same seeds (every change drawn often)."""
    xs = _images(12)
    aug = StyleAugment(32, StyleAugmentConfig(background_p=0.7, jitter_p=0.7, grayscale_p=0.4, blur_p=0.4))
    alone, draws = [], []
    for k, x in enumerate(xs):
        torch.manual_seed(k)
        alone.append(aug(x))
        torch.manual_seed(k)
        draws.append(aug.draw(x, key=k))
    batch = aug.apply(torch.stack(xs), default_collate(draws))
    assert torch.allclose(batch, torch.stack(alone), atol=1e-6)
    assert len({bool(d.grey) for d in draws}) == len({bool(d.blur) for d in draws}) == 2  # both kinds in the batch


def test_crops_are_torchvisions_resized_crops() -> None:
    """The batched crop gives torchvision's `resized_crop` (bilinear, antialias) for each image's own box."""
    xs = _images(8)
    aug = StyleAugment(32, StyleAugmentConfig(**{**OFF, "crop_scale": (0.3, 1.0), "crop_ratio": (0.6, 1.6)}))
    torch.manual_seed(0)
    draws = [aug.draw(x) for x in xs]
    out = aug.apply(torch.stack(xs), default_collate(draws))
    for x, d, y in zip(xs, draws, out):
        ref = TF.resized_crop(x.float() / 255, d.top, d.left, d.height, d.width, [32, 32], antialias=True)
        assert torch.allclose(y, ref.clamp(0, 1), atol=1e-5)
    assert len({(d.height, d.width) for d in draws}) > 4  # boxes of many shapes


def test_background_masks_are_kept_per_key() -> None:
    x, aug = _face(), StyleAugment(32, StyleAugmentConfig(**{**OFF, "background_p": 1.0}))
    first = aug.draw(x, key=7).mask
    assert aug.draw(torch.zeros_like(x), key=7).mask is first  # an image's mask, found again by its cache row
    assert not aug.draw(torch.zeros_like(x)).mask.any()  # without a key: computed (black has no white border)
    with pytest.raises(ValueError, match="takes"):
        aug.draw(torch.zeros(3, 16, 16, dtype=torch.uint8))


def test_trainer_option_needs_the_image_cache() -> None:
    assert TrainConfig(train_data="t.csv", output="o", style_augment=True).style_augment
    with pytest.raises(ClipkitError, match="decoded-image cache"):
        TrainConfig(train_data="t.csv", output="o", style_augment=True, cache_images=False)


def test_locked_text_features_are_computed_once_per_caption() -> None:
    """Rows sharing a caption (one emoji in several art styles) get the same features, equal to the caption's own."""
    import clipkit
    from clipkit.train.setup import locked_text_features

    model, tok = clipkit.create_model_and_tokenizer("tiny")
    model.eval()
    captions = ["red apple", "a cat", "red apple", "a train", "a cat"]
    feats = locked_text_features(model, tok, captions, progress=False)
    with torch.no_grad():
        each = torch.cat([model.text_pooled(tok([c])) for c in captions])
    assert feats.shape == each.shape and torch.allclose(feats, each, atol=1e-5)
    assert torch.equal(feats[0], feats[2]) and torch.equal(feats[1], feats[4])


def test_locked_text_features_follow_the_run_precision() -> None:
    """In bf16 the cached features are float32 rows close to the fp32 ones, each still at its own caption's row."""
    import clipkit
    from clipkit.train.setup import locked_text_features

    model, tok = clipkit.create_model_and_tokenizer("tiny")
    model.eval()
    captions = ["a very long caption about a red apple on a table", "cat", "a train at the station", "cat"]
    fp32 = locked_text_features(model, tok, captions, progress=False)
    bf16 = locked_text_features(model, tok, captions, progress=False, precision="bf16")
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, fp32)
    assert torch.nn.functional.cosine_similarity(bf16, fp32).min() > 0.99
