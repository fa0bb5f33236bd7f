"""Rank demo recipes by what users care about: emoji never trained on, in an art style never trained on,
found by their plain names. Trains one recipe for a fixed number of steps on a built emoji dataset
(`clipkit data emoji --out DIR`), evaluates it as the demo does, and appends one JSON line to --log.

    python benchmarks/bench_emoji_recipe.py --data emoji --recipe style --steps 400 --seed 0 --log recipes.jsonl
"""
from __future__ import annotations

import argparse
import functools
import json
import platform
import time
from pathlib import Path
from typing import Optional

import pandas as pd

from clipkit.app.demo import MemoEmbedder, evaluate_scopes
from clipkit.data.augment import StyleAugment, StyleAugmentConfig
from clipkit.data.tables import read_table
from clipkit.embed import Embedder
from clipkit.model import config
from clipkit.evaluate.zeroshot import load_templates
from clipkit.train import TrainConfig, train
from clipkit.train import setup as train_setup

ALL_FORMS = ("name", "template", "variant")
# name -> (caption forms trained on, trainer options, StyleAugmentConfig overrides)
RECIPES = {
    "templates": (("template",), {}, {}),  # the first demo's recipe: "a X emoji" / "X 이모지", no augmentation
    "captions": (ALL_FORMS, {}, {}),
    "captions_crop": (ALL_FORMS, {"augment": True}, {}),
    "style": (ALL_FORMS, {"style_augment": True}, {}),
    # + CLDR keyword captions: needs a dataset built with `clipkit data emoji --keywords`
    "style_keywords": ((*ALL_FORMS, "keywords"), {"style_augment": True}, {}),
    "style_nogrey": (ALL_FORMS, {"style_augment": True}, {"grayscale_p": 0.0, "hue": 0.0}),
    "style_strong": (ALL_FORMS, {"style_augment": True}, {"crop_scale": (0.35, 1.0), "background_p": 0.8,
                                                          "blur_p": 0.3}),
    "style_light": (ALL_FORMS, {"style_augment": True}, {"crop_scale": (0.8, 1.0), "background_p": 0.3,
                                                         "jitter_p": 0.5, "brightness": 0.2, "contrast": 0.2,
                                                         "saturation": 0.2, "hue": 0.0, "grayscale_p": 0.05,
                                                         "blur_p": 0.0}),
    "style_bf16": (ALL_FORMS, {"style_augment": True, "precision": "bf16"}, {}),
    "style_resnet18": (ALL_FORMS, {"style_augment": True, "model": "resnet18-minilm"}, {}),
    "style_resnet10t": (ALL_FORMS, {"style_augment": True, "model": "resnet10t-minilm"}, {}),
    "style_convnext_atto": (ALL_FORMS, {"style_augment": True, "model": "convnext_atto-minilm"}, {}),
    # FLIP-style patch dropout (`--patch-dropout`: fewer tokens per step, so also faster); 0.5 is the demo's
    "style_pdrop25": (ALL_FORMS, {"style_augment": True, "patch_dropout": 0.25}, {}),
    "style_pdrop50": (ALL_FORMS, {"style_augment": True, "patch_dropout": 0.5}, {}),
    "style_pdrop75": (ALL_FORMS, {"style_augment": True, "patch_dropout": 0.75}, {}),
    "style_pdrop50_unmasked": (ALL_FORMS, {"style_augment": True, "patch_dropout": 0.5, "unmasked_steps": 160}, {}),
    # ImageNet EfficientNet-Lite0 (`lite0-minilm`, 96 px): locked whole, or but for its last 2 / 4 / 6 layer groups;
    # lite0_part4 was the demo's in session 8
    "lite0_locked": (ALL_FORMS, {"style_augment": True, "model": "lite0-minilm", "lock_image": True,
                                 "lock_image_freeze_bn_stats": True}, {}),
    **{f"lite0_part{n}": (ALL_FORMS, {"style_augment": True, "model": "lite0-minilm", "lock_image_unlocked_groups": n,
                                      "lock_image_freeze_bn_stats": True}, {}) for n in (2, 4, 6)},
    # the same with EfficientNet-Lite2 (`lite2-minilm`, 96 px): the demo's since session 9
    **{f"lite2_part{n}": (ALL_FORMS, {"style_augment": True, "model": "lite2-minilm", "lock_image_unlocked_groups": n,
                                      "lock_image_freeze_bn_stats": True}, {}) for n in (4, 6)},
}


def _cnn_preset(timm_name: str):
    """`tiny-minilm` with a timm CNN for the image tower (random-initialised, 64 px)."""
    def make():
        cfg = config.get_preset("tiny-minilm")
        cfg.vision = config.VisionConfig(timm_name, {})
        return cfg
    return make


for _name in ("resnet18", "resnet10t", "convnext_atto"):
    config.PRESETS.setdefault(f"{_name}-minilm", _cnn_preset(_name))
KEYS = ["style_test_name_en/text_to_image_R@1", "style_test_zeroshot/top1", "style_test_name_en/text_to_image_R@10",
        "style_test_template_en/text_to_image_R@1", "style_test_name_ko/text_to_image_R@1",
        "style_zeroshot/top1", "style_name_en/text_to_image_R@1",
        "zeroshot/top1", "zeroshot/top5", "test_name_en/text_to_image_R@1", "test_name_en/text_to_image_R@10",
        "retrieval/text_to_image_R@1",
        "retrieval/text_to_image_R@10", "retrieval/image_to_text_R@1", "retrieval_en/text_to_image_R@10",
        "style_test_name_en/chance_text_to_image_R@1", "style_test_zeroshot/chance_top1"]


def _resized(preset: str, size: int) -> str:
    """A preset drawn at `size` px (registered as `preset@size`)."""
    def make():
        cfg = config.get_preset(preset)
        cfg.preprocess.image_size = size
        return cfg
    config.PRESETS.setdefault(f"{preset}@{size}", make)
    return f"{preset}@{size}"


def run(data: Path, recipe: str, steps: int, seed: int, out: Path, lr: float, batch: int,
        image_size: Optional[int] = None) -> dict:
    forms, extra, aug = RECIPES[recipe]
    if image_size:
        extra = {**extra, "model": _resized(extra.get("model", "tiny-minilm"), image_size)}
    table = pd.read_csv(data / "train.csv", keep_default_na=False)
    train_csv = data / f"train_{'_'.join(forms)}.csv"  # the dataset may hold more forms (keywords) than trained on
    table[table["form"].isin(forms)].to_csv(train_csv, index=False)
    train_setup.StyleAugment = functools.partial(StyleAugment, cfg=StyleAugmentConfig(**aug))
    templates = load_templates(data / "templates.txt")
    cfg = TrainConfig(train_data=str(train_csv), val_data=None, output=str(out), lock_text=True,
                      max_steps=steps, batch_size=batch, lr=lr, seed=seed, checkpoint_every=10**9, log_every=50,
                      progress=False, val_templates=templates, **{"model": "tiny-minilm", **extra})
    t0 = time.perf_counter()
    summary = train(cfg)
    seconds = time.perf_counter() - t0
    tables = {s: read_table(data / f"{s}.csv") for s in ("train", "val", "test", "holdout")}
    t1 = time.perf_counter()
    metrics = evaluate_scopes(MemoEmbedder(Embedder(summary["model_dir"], progress=False)), tables, templates)
    return {"recipe": recipe, "image_size": image_size, "forms": list(forms), "trainer": extra, "augment": aug,
            "steps": summary["steps"], "batch": batch, "lr": lr, "seed": seed, "train_seconds": round(seconds, 1),
            "eval_seconds": round(time.perf_counter() - t1, 1), "cpu": platform.processor() or platform.machine(),
            **{k: round(metrics[k], 4) for k in KEYS if k in metrics}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="a built emoji dataset with holdout.csv")
    p.add_argument("--recipe", choices=sorted(RECIPES), required=True)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=None, help="draw the recipe's preset at this size instead")
    p.add_argument("--out", type=Path, default=Path("runs/recipe"))
    p.add_argument("--log", type=Path, default=Path("recipes.jsonl"))
    args = p.parse_args()
    size = f"_{args.image_size}px" if args.image_size else ""
    rec = run(args.data, args.recipe, args.steps, args.seed,
              args.out / f"{args.recipe}{size}_s{args.seed}_{args.steps}", args.lr, args.batch_size, args.image_size)
    with open(args.log, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")
    print(json.dumps(rec, indent=1))


if __name__ == "__main__":
    main()
