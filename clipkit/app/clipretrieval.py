"""The clip-retrieval back-end API (`clip_retrieval.clip_back`), so its `ClipClient` and web front end work against
`clipkit serve` unchanged: `GET /indices-list`, `POST /knn-service`, `POST /metadata`.

Bodies are read as JSON whatever the Content-Type (the `ClipClient` sends none, the front end `text/plain`);
JSON `NaN`/`Infinity`, deep nesting and huge numbers are 400s. The answers follow `clip_back`: a list of
`{"id", "similarity", ...metadata}`, best first; the first `num_images` carry the metadata (the result columns,
`url`: the metadata's own, else this server's `/thumb` of the image; `image`: the thumbnail as base64 when
`KnnOptions.images` or the request's `return_image`), the rest only `id` and `similarity`. `deduplicate` drops
results that near-duplicate a better one at cosine 0.94, as clip-retrieval does (`search.dedup`).

Where clipkit differs, it says so in the `X-Clipkit-Notes` response header, never by a 500: the options it has
no model for (`use_safety_model`, `use_violence_detector`, `use_mclip`, `aesthetic_score`) are ignored;
`num_result_ids` above the server's `max_k` is cut to it; `text` with `image` is one combined query
(`image_weight`, default 0.5) where clip-retrieval would use the text alone; `similarity` is the cosine (an
`embedding_input` is normalised). `modality: "text"` (search the caption embeddings) is refused: the index holds
image embeddings. `image_url` is refused unless `KnnOptions.image_url` (`--allow-image-url`): by default the
server never fetches a URL a client names, and when allowed only public addresses (`fetch`).
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ..search.dedup import CLIP_RETRIEVAL_THRESHOLD, drop_near_duplicates
from ..search.index import MAX_K
from ..search.query import IMAGE_WEIGHT
from .fetch import fetch_image_url
from .guard import ApiError

IGNORED = ("use_safety_model", "use_violence_detector", "use_mclip", "aesthetic_score")  # no model for these
KNOWN = frozenset({"text", "image", "image_url", "embedding_input", "modality", "num_images", "num_result_ids",
                   "indice_name", "deduplicate", "aesthetic_weight", "return_image", "image_weight", *IGNORED})
NOTES_HEADER = "x-clipkit-notes"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KnnOptions:
    """Server-side options of the clip-retrieval API: `images=True` puts each metadata row's thumbnail in
    `image` (base64) for every request, as clip-retrieval does for indexes with an `image_path` column."""

    images: bool = False
    image_url: bool = False  # fetch `image_url` (public http(s) addresses only, `fetch`); off: a 400


@dataclass
class KnnRequest:
    """A checked `/knn-service` body."""

    text: str | None = None
    image: bytes | None = None
    image_url: str | None = None
    embedding: np.ndarray | None = None
    image_weight: float = IMAGE_WEIGHT
    num_images: int = 40
    num_result_ids: int = 40
    deduplicate: bool = False
    return_image: bool = False
    notes: list[str] = field(default_factory=list)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"JSON {name} is not a number")


def read_json(raw: bytes) -> dict:
    """A JSON object from a request body, whatever the Content-Type; 400 for anything else."""
    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError):  # bad UTF-8 or JSON, NaN, > 4300-digit ints, deep nesting
        raise ApiError(400, "the body must be a JSON object (UTF-8)") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


def _int(body: dict, name: str, default: int, lo: int, hi: int) -> int:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ApiError(422, f"{name} must be an integer in {lo}..{hi}")
    return value


def _flag(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise ApiError(422, f"{name} must be true or false")
    return bool(value)


def _query_parts(body: dict, max_chars: int, dim: int) -> tuple[str | None, bytes | None, np.ndarray | None]:
    """text, decoded image bytes and embedding of a body; "" and null count as absent, as in clip-retrieval."""
    text, image, emb = (body.get(k) for k in ("text", "image", "embedding_input"))
    if text not in (None, "") and (not isinstance(text, str) or len(text) > max_chars):
        raise ApiError(400, f"text must be a string of at most {max_chars} characters")
    data = None
    if image not in (None, ""):
        if not isinstance(image, str):
            raise ApiError(400, "image must be a base64 string")
        try:
            data = base64.b64decode(image.split(",", 1)[-1] if image.startswith("data:") else image, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "image is not valid base64") from None
    vector = None
    if emb is not None:
        if (not isinstance(emb, list) or len(emb) != dim
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in emb)):
            raise ApiError(400, f"embedding_input must be a list of {dim} numbers")
        vector = np.asarray(emb, np.float64)
        if not np.isfinite(vector).all() or not np.abs(vector).max() > 0:
            raise ApiError(400, "embedding_input must be finite and not all zero")
    return text or None, data, vector


def _image_url(body: dict, options: KnnOptions) -> str | None:
    url = body.get("image_url")
    if url in (None, ""):
        return None
    if not options.image_url:
        raise ApiError(400, "image_url is off: this server never fetches URLs unless started with "
                            "--allow-image-url; send the image itself, base64-encoded, in 'image'")
    if not isinstance(url, str):
        raise ApiError(400, "image_url must be a string")
    return url


def parse_knn(body: dict, max_k: int, max_chars: int, dim: int, options: KnnOptions) -> KnnRequest:
    """Check a `/knn-service` body against the limits; what clipkit does differently goes in `notes`."""
    req = KnnRequest()
    req.text, req.image, req.embedding = _query_parts(body, max_chars, dim)
    req.image_url = _image_url(body, options)
    if req.image_url is not None and req.image is not None:
        raise ApiError(400, "give image or image_url, not both")
    has_image = req.image is not None or req.image_url is not None
    if req.embedding is not None and (req.text or has_image):
        raise ApiError(400, "give text and/or image, or embedding_input, not both")
    if req.embedding is None and not req.text and not has_image:
        raise ApiError(400, "give one of text, image or embedding_input")
    if body.get("modality", "image") not in ("image", None):
        raise ApiError(400, "modality must be 'image': this index holds image embeddings, not caption embeddings")
    req.num_images = _int(body, "num_images", 40, 0, MAX_K)
    asked = _int(body, "num_result_ids", max(req.num_images, 1), 1, MAX_K)
    req.num_result_ids = min(asked, max_k)
    if asked > max_k:
        req.notes.append(f"num_result_ids cut from {asked} to this server's max_k {max_k}")
    weight = body.get("image_weight", IMAGE_WEIGHT)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight <= 1:
        raise ApiError(422, "image_weight must be a number in 0..1")
    req.image_weight = float(weight)
    if req.text and has_image:
        req.notes.append(f"text and image combined (image_weight {req.image_weight:g})")
    req.deduplicate, req.return_image = _flag(body, "deduplicate"), _flag(body, "return_image") or options.images
    ignored = [k for k in IGNORED if body.get(k) not in (None, "", False)]
    if ignored:
        req.notes.append(f"ignored: {', '.join(ignored)}")
    unknown = sorted(set(body) - KNOWN)
    if unknown:
        req.notes.append(f"unknown fields ignored: {', '.join(k[:40] for k in unknown[:10])}")
    return req


def _metadata_rows(svc: Any, hits: list[dict], base_url: str, images: bool) -> list[dict]:
    """clip-retrieval's metadata of result rows: the result columns, `url` and optionally `image` (base64)."""
    out = []
    for hit in hits:
        meta = {c: hit[c] for c in svc.columns if c in hit and hit[c] is not None}
        if "url" not in meta and svc.roots:
            meta["url"] = f"{base_url}/thumb/{hit['id']}?index={svc.name}"
        if images and svc.roots:
            try:
                data, _ = svc.cached_thumb(svc.thumb_row(str(hit["id"])))
                meta["image"] = base64.b64encode(data).decode("ascii")
            except ApiError:
                pass  # no readable file: the row keeps its url only
        out.append(meta)
    return out


def knn(svc: Any, req: KnnRequest, base_url: str) -> list[dict]:
    """Run one checked request on a service (in a worker thread): search, deduplicate, attach metadata."""
    if req.embedding is not None:
        q = (req.embedding / np.linalg.norm(req.embedding)).astype(np.float32)[None, :]
    else:
        image = req.image if req.image_url is None else fetch_image_url(req.image_url, svc.limits.max_upload_bytes)
        q = svc.query_vector(req.text, image, (), req.image_weight)
    try:
        scores, ids = svc.index.search(q, req.num_result_ids)
        if req.deduplicate:
            scores, ids = drop_near_duplicates(svc.index, scores, ids, CLIP_RETRIEVAL_THRESHOLD)
    except ValueError:
        raise ApiError(400, "the query could not be searched") from None
    hits = svc.index.results(scores, ids)[0]
    meta = _metadata_rows(svc, hits[:req.num_images], base_url, req.return_image)
    return [{**m, "id": h["id"], "similarity": h["score"]} for m, h in zip(meta, hits)] + [
        {"id": h["id"], "similarity": h["score"]} for h in hits[req.num_images:]]


def _ids(body: dict, svc: Any) -> list[int]:
    ids = body.get("ids")
    limit = svc.limits.max_k
    if not isinstance(ids, list) or len(ids) > limit:
        raise ApiError(422, f"ids must be a list of at most {limit} ids")
    rows = len(svc.index.metadata)
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < rows and not svc.index.deleted[i]
               for i in ids):
        raise ApiError(400, "ids must be ids of this index's results")
    return ids


def _base_url(request: Request) -> str:
    """This server as the client reached it (the Host the guard let through)."""
    host = request.headers.get("host") or f"{request.url.hostname}:{request.url.port}"
    return f"{request.url.scheme}://{host}"


def _notes(notes: list[str]) -> dict[str, str]:
    if notes:
        log.info("clip-retrieval request: %s", "; ".join(notes))
    return {NOTES_HEADER: "; ".join(notes).encode("ascii", "replace").decode()} if notes else {}


def add_clip_retrieval_routes(app: FastAPI, services: Mapping[str, Any], options: KnnOptions) -> None:
    """Add the three clip-retrieval routes over `services` ({name: Service}); `indice_name` picks one."""
    def pick(body: dict) -> Any:
        name = body.get("indice_name")
        if name is None:
            return next(iter(services.values()))
        if not isinstance(name, str) or name not in services:
            raise ApiError(404, f"unknown indice_name; served: {sorted(services)}")
        return services[name]

    @app.get("/indices-list")
    async def indices_list() -> list[str]:
        return list(services)

    @app.post("/knn-service")
    async def knn_service(request: Request) -> JSONResponse:
        body = read_json(await request.body())
        svc = pick(body)
        req = parse_knn(body, svc.limits.max_k, svc.limits.max_query_chars, svc.index.dim, options)
        base = _base_url(request)
        results = await svc.limited(lambda: knn(svc, req, base))
        return JSONResponse(results, headers=_notes(req.notes))

    @app.post("/metadata")
    async def metadata(request: Request) -> JSONResponse:
        body = read_json(await request.body())
        svc = pick(body)
        ids = _ids(body, svc)
        images = _flag(body, "return_image") or options.images
        hits = svc.index.results(np.zeros((1, len(ids)), np.float32), np.asarray([ids], np.int64))[0]
        base = _base_url(request)
        rows = await svc.limited(lambda: _metadata_rows(svc, hits, base, images))
        return JSONResponse([{"id": h["id"], "metadata": m} for h, m in zip(hits, rows)])
