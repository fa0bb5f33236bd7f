"""Load a CLIP checkpoint you have on disk (Hugging Face dir or OpenCLIP/OpenAI file), check it, save it as clipkit.

    python examples/load_pretrained.py --open-clip laion.safetensors --arch ViT-B-32 --out vit-b-32
    python examples/load_pretrained.py --open-clip openai.pt --arch ViT-B-32-quickgelu --out vit-b-32-openai
    python examples/load_pretrained.py --hf clip-vit-base-patch32/ --out vit-b-32 --export-hf vit-b-32-hf

`--arch` follows open_clip's naming: ViT-B-32 is GELU (LAION, DataComp weights), ViT-B-32-quickgelu is QuickGELU
(OpenAI weights). Weights by name need no file: clipkit.load("ViT-B-32:laion2b_s34b_b79k") or "hf-hub:org/name".
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

import torch
from PIL import Image, ImageDraw

import clipkit

CAPTIONS = ["a red circle", "a blue square", "a photo of a dog"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", help="a transformers CLIPModel directory (save_pretrained output)")
    src.add_argument("--open-clip", help="an OpenCLIP/OpenAI ViT state dict (.pt, .bin or .safetensors)")
    p.add_argument("--arch", help="the model name the weights are, e.g. ViT-B-32 or ViT-B-32-quickgelu (--open-clip)")
    p.add_argument("--quick-gelu", dest="quick_gelu", action=argparse.BooleanOptionalAction, default=None,
                   help="the activation, for a file without --arch (OpenAI weights use QuickGELU)")
    p.add_argument("--image", help="image for the sanity check (default: a drawn red circle)")
    p.add_argument("--out", required=True, help="where the clipkit model directory goes")
    p.add_argument("--export-hf", help="also export back to a transformers.CLIPModel directory here")
    args = p.parse_args(argv)

    # arch and quick_gelu apply to OpenCLIP files only; a Hugging Face directory describes itself
    model, preprocess, tokenizer = clipkit.load(args.hf or args.open_clip, arch=args.arch, quick_gelu=args.quick_gelu)
    print(f"loaded: {model.embed_dim}-d embeddings, {preprocess.cfg.image_size} px images")

    image = clipkit.load_image(args.image) if args.image else Image.new("RGB", (224, 224), "white")
    if not args.image:
        ImageDraw.Draw(image).ellipse((40, 40, 184, 184), fill="red")
    with torch.no_grad():
        z_img = model.encode_image(preprocess(image)[None])  # [1, D]
        z_txt = model.encode_text(tokenizer(CAPTIONS))  # [3, D]
        probs = (model.scales()[0] * z_img @ z_txt.T).softmax(-1)[0]  # [1, 3] -> [3]
    for caption, prob in zip(CAPTIONS, probs.tolist()):
        print(f"  p={prob:.3f}  {caption}")  # a trained model puts most mass on "a red circle"

    clipkit.save(model, tokenizer, args.out)
    reloaded, _, _ = clipkit.load(args.out)
    with torch.no_grad():
        diff = (reloaded.encode_image(preprocess(image)[None]) - z_img).abs().max().item()
    print(f"saved to {args.out} (reload max |diff| {diff:.1e})")
    if args.export_hf:
        clipkit.save_hf(model, tokenizer, args.export_hf)
        print(f"exported to {args.export_hf} (transformers.CLIPModel.from_pretrained loads it)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
