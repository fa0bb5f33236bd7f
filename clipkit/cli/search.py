"""`clipkit search`, `dedup`, `serve`: the commands that use an index (arguments and printing only)."""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Optional, Union

from ..errors import ClipkitError
from .common import add_precision, model_arg

NAMED = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]{0,63})=(.+)")


def _cmd_search(args: argparse.Namespace) -> int:
    from ..search.collection import open_search, search_collection

    if args.text is None and args.image is None:
        raise ValueError("give --text, --image or both (a combined query)")
    index, embedder, warnings = open_search(args.index, model_arg(args))
    for w in warnings:
        print(f"clipkit search: warning: {w}", file=sys.stderr)
    result = search_collection(index, embedder, text=args.text, image=args.image, k=args.k, rerank=args.rerank,
                               filter=args.filter, mmr=args.mmr, negative=args.negative,
                               image_weight=args.image_weight, dedup=args.dedup)
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
        return 0
    print(f"{'rank':>4s}  {'score':>7s}  {'id':>7s}  image / caption")
    for rank, r in enumerate(result["results"], 1):
        caption = str(r.get("caption") or "")[:60]
        print(f"{rank:4d}  {r['score']:+.4f}  {r['id']:7d}  {r.get('image_rel') or r.get('image')}  {caption}")
    if not result["results"]:
        print("no results")
    return 0


def _cmd_dedup(args: argparse.Namespace) -> int:
    from ..fileio import atomic_path
    from ..search.dedup import duplicate_groups, near_duplicate_pairs
    from ..search.index import SearchIndex

    index = SearchIndex.load(args.index)
    pairs = near_duplicate_pairs(index, args.threshold)
    table = pairs if args.pairs else duplicate_groups(pairs, index.metadata)
    if args.out:
        with atomic_path(args.out) as tmp:
            table.to_parquet(tmp, index=False) if str(args.out).endswith(".parquet") else table.to_csv(tmp, index=False)
    groups = duplicate_groups(pairs) if args.pairs else table
    extra = int((~groups["keep"]).sum()) if len(groups) else 0
    print(f"{len(pairs)} near-duplicate pair(s) at cosine >= {args.threshold} in {groups['group'].nunique()} "
          f"group(s): {extra} image(s) beyond the first of each group, of {len(index)}")
    if not args.out:
        print(table.head(args.show).to_string(index=False) if len(table) else "no near-duplicates")
    else:
        print(f"wrote {args.out}")
    return 0


def named_paths(values: list[str], what: str) -> Union[str, dict[str, str]]:
    """`--index DIR` once -> DIR; `--index NAME=DIR` (repeated) -> {NAME: DIR}, in order. An existing folder
    whose name holds '=' is a plain folder."""
    if len(values) == 1 and (Path(values[0]).is_dir() or not NAMED.fullmatch(values[0])):
        return values[0]
    out: dict[str, str] = {}
    for value in values:
        match = NAMED.fullmatch(value)
        if match is None:
            raise ValueError(f"--{what} {value!r}: with several, give each as NAME={what.upper()}_DIR")
        if match.group(1) in out:
            raise ValueError(f"--{what}: name {match.group(1)!r} given twice")
        out[match.group(1)] = match.group(2)
    return out


def _models(values: list[str], indexes: Union[str, dict[str, str]]) -> Union[str, dict[str, str]]:
    """One `--model DIR` for every index, or `--model NAME=DIR` per index."""
    models = named_paths(values, "model")
    if isinstance(models, dict) and not isinstance(indexes, dict):
        raise ValueError("--model NAME=DIR needs --index NAME=DIR")
    return models


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        from ..app.service import run_server
    except ImportError as e:
        raise ClipkitError(f"the HTTP service is not available ({e})") from None
    if args.api_key:
        print("clipkit serve: warning: --api-key is visible to every user of this machine (ps); "
              "prefer --api-key-file or $CLIPKIT_API_KEY", file=sys.stderr)
    indexes = named_paths(args.index, "index")
    models = _models(args.model, indexes)
    options = {name: value for name, value in (("result_columns", args.result_column),
                                               ("image_roots", args.image_root), ("max_pixels", args.max_pixels),
                                               ("max_k", args.max_k), ("allow_origins", args.allow_origin),
                                               ("precision", args.precision))
               if value is not None}
    run_server(indexes, models, host=args.host, port=args.port, api_key=_api_key(args),
               insecure_no_auth=args.insecure_no_auth, knn_images=args.knn_images,
               allow_image_url=args.allow_image_url,
               on_ready=lambda url: print(f"listening on {url}", flush=True), **options)
    return 0


def _api_key(args: argparse.Namespace) -> Optional[str]:
    """The key from --api-key-file, --api-key or $CLIPKIT_API_KEY (in that order), else None."""
    if args.api_key_file:
        try:
            key = open(args.api_key_file, encoding="utf-8").read().strip()
        except OSError as e:
            raise ValueError(f"--api-key-file {args.api_key_file}: {e.strerror or e}") from None
        if not key:
            raise ValueError(f"--api-key-file {args.api_key_file} is empty")
        return key
    return args.api_key or os.environ.get("CLIPKIT_API_KEY") or None


def add_search(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="query an index by text or image")
    p.add_argument("--index", required=True, help="index folder from `clipkit index build`")
    p.add_argument("--model", required=True, help="the model that embedded the collection")
    p.add_argument("--text", help='text query; words starting with - are negative terms ("cat -dog", -"red car")')
    p.add_argument("--image", help="image file query (with --text: a combined query)")
    p.add_argument("--image-weight", type=float, default=0.5, metavar="W",
                   help="share of the image in a text + image query, 0..1 (default 0.5)")
    p.add_argument("--negative", action="append", metavar="TEXT",
                   help="rank images resembling this text lower (repeat; like -word in --text)")
    p.add_argument("--dedup", type=float, nargs="?", const=0.94, metavar="COSINE",
                   help="drop results that near-duplicate a better one (default cosine 0.94, clip-retrieval's)")
    p.add_argument("-k", type=int, default=10, help="results to return (default 10)")
    p.add_argument("--rerank", type=int, default=0, metavar="R", help="re-score k*R candidates exactly")
    p.add_argument("--filter", help='metadata filter: comparisons (== != < <= > >=), in [...], and/or/not, '
                   'e.g. \'style == "noto" and year >= 2020\' (parsed, never run as code)')
    p.add_argument("--mmr", type=float, metavar="LAMBDA", help="diversify with maximal marginal relevance (0..1)")
    p.add_argument("--json", action="store_true", help='print {"results": [...]} as the HTTP service returns it')
    add_precision(p)
    p.set_defaults(func=_cmd_search)


def add_dedup(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dedup", help="find near-duplicate images in an index (range search)")
    p.add_argument("--index", required=True, help="index folder from `clipkit index build`")
    p.add_argument("--threshold", type=float, default=0.95, help="cosine similarity of near-duplicates (default 0.95)")
    p.add_argument("--out", help="write the table here (.csv, or .parquet); default: print the first rows")
    p.add_argument("--pairs", action="store_true", help="one row per pair (a, b, similarity) instead of per group "
                   "member (group, id, keep, similarity, metadata)")
    p.add_argument("--show", type=int, default=20, help="rows printed without --out (default 20)")
    p.set_defaults(func=_cmd_dedup)


def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve indexes over HTTP (search API, clip-retrieval API, web page)")
    p.add_argument("--index", required=True, action="append", metavar="[NAME=]DIR",
                   help="index folder from `clipkit index build`; repeat as NAME=DIR to serve several by name")
    p.add_argument("--model", required=True, action="append", metavar="[NAME=]DIR",
                   help="the model that embedded the collection(s): one for all, or NAME=DIR per index "
                        "(a model shared by several indexes is loaded once)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--api-key-file", help="require the key in this file (first line); keeps it out of ps")
    p.add_argument("--api-key", help="require this key (visible in ps; default: $CLIPKIT_API_KEY, else no key)")
    p.add_argument("--insecure-no-auth", action="store_true",
                   help="allow a non-loopback --host without a key (only behind a proxy that authenticates)")
    p.add_argument("--result-column", action="append", metavar="COLUMN",
                   help="metadata column results carry (repeat; default: all but the file paths)")
    p.add_argument("--image-root", action="append", metavar="DIR",
                   help="folder thumbnails may come from (repeat; default: the folder holding all indexed images)")
    p.add_argument("--max-pixels", type=int, help="largest decoded upload, in pixels (default: 64 x the model's "
                   "image size squared, at least 1000000)")
    p.add_argument("--max-k", type=int, help="most results per query, k and num_result_ids (default 100)")
    p.add_argument("--allow-origin", action="append", metavar="ORIGIN",
                   help="a web origin whose pages may call the API (CORS), e.g. the clip-retrieval front end's "
                        "http://localhost:8080 (repeat; default none)")
    p.add_argument("--knn-images", action="store_true",
                   help="clip-retrieval answers carry each result's thumbnail as base64 `image` (as clip-retrieval "
                        "does with an image_path column)")
    p.add_argument("--allow-image-url", action="store_true",
                   help="let /knn-service fetch a client's image_url (public http(s) addresses only; default: refused)")
    add_precision(p)
    p.set_defaults(func=_cmd_serve)

