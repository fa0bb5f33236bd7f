"""Zero-shot label every image in a folder from class names, with a prompt-template ensemble.

    python examples/zeroshot_folder.py --model my-model --images photos/ --classes "cat,dog,apple" --out labels.csv

Each class is the mean embedding of its prompts (`DEFAULT_TEMPLATES`, "a photo of a {}." and "{}", or
a `--templates` file such as the emoji dataset's templates.txt); each image gets the class it is most
similar to. `score` is that class's softmax probability.
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from clipkit import Embedder
from clipkit.data import read_folder
from clipkit.evaluate import DEFAULT_TEMPLATES, load_templates, zero_shot_weights


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="clipkit, Hugging Face CLIP or OpenCLIP model")
    p.add_argument("--images", required=True, help="folder of images (searched recursively)")
    p.add_argument("--classes", required=True, help='comma-separated class names, e.g. "cat,dog,apple"')
    p.add_argument("--templates", help="file of prompt templates, one per line with {} for the class name")
    p.add_argument("--out", default="labels.csv")
    args = p.parse_args(argv)

    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    paths = read_folder(args.images, keep_uncaptioned=True)["image"].tolist()  # every image, captions or not
    if not paths:
        raise SystemExit(f"{args.images}: no images found")
    templates = load_templates(args.templates) if args.templates else DEFAULT_TEMPLATES
    embedder = Embedder(args.model)
    weights = zero_shot_weights(embedder.texts, classes, templates)  # [C, D]
    images = embedder.images(paths, on_error="nan")  # [N, D]; an unreadable image is a NaN row
    scale = embedder.model.scales()[0].item()  # the model's own softmax temperature (100 for OpenAI CLIP)
    logits = scale * images @ weights.T  # [N, D] @ [D, C] -> [N, C]
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)

    failed = np.isnan(images).any(axis=1)
    best = np.nan_to_num(probs, nan=-1.0).argmax(1)
    labels = pd.DataFrame({
        "image": paths,
        "label": np.where(failed, "", np.asarray(classes)[best]),
        "score": np.where(failed, np.nan, probs[np.arange(len(paths)), best]).round(4),
    })
    labels.to_csv(args.out, index=False)

    print(f"labelled {int((~failed).sum())} of {len(paths)} images -> {args.out}")
    print(labels[~failed].groupby("label")["score"].agg(["count", "mean"]).rename(columns={"mean": "mean_score"}))
    for i, err in embedder.failures:
        print(f"unreadable, left unlabelled: {err}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
