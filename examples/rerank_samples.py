"""Best-of-N: rank generated samples by how well they match their prompt, and draw a contact sheet.

    python examples/rerank_samples.py --model my-model --prompt "a red apple" samples/*.png --top 4 --sheet best.png

Scores are cosine similarities between each image and the prompt; images that fail to load rank last.
"""
from __future__ import annotations

import argparse
import json
from typing import Optional, Sequence

from clipkit import Embedder
from clipkit.evaluate import ranking_json, rerank
from clipkit.report import contact_sheet


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("images", nargs="+", help="candidate image files")
    p.add_argument("--model", required=True, help="clipkit, Hugging Face CLIP or OpenCLIP model")
    p.add_argument("--prompt", required=True, help="the prompt the samples were generated from")
    p.add_argument("--negative", help="optional prompt to steer away from, e.g. 'blurry, text'")
    p.add_argument("--top", type=int, default=4, help="keep the best TOP samples")
    p.add_argument("--sheet", default="rerank.png", help="contact sheet PNG of the kept samples")
    p.add_argument("--json", help="also write the ranking as JSON here")
    args = p.parse_args(argv)

    embedder = Embedder(args.model, progress=False)
    ranked = rerank(embedder, args.prompt, list(args.images), negative_prompt=args.negative, top=args.top)
    for r in ranked:
        print(f"#{r.rank}  {r.score:+.4f}  {r.image}" + (f"  ({r.error})" if r.error else ""))
    contact_sheet(ranked, args.sheet, prompt=args.prompt)
    print(f"contact sheet: {args.sheet}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(ranking_json(args.prompt, ranked), f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
