"""HTTP search service: a FastAPI app over one SearchIndex + Embedder, and a hardened uvicorn runner.

Routes: `GET /search?q=&k=` (text, `-word` negative terms as in `search.query`; exact-match filters on metadata
columns, e.g. `&style=emoji`, and/or `&filter=<filter string>` in the grammar of `search.filters`), `POST /search`
(multipart `file` image, optional `k`, and `q` + `image_weight` for a combined query), `GET /thumb/{id}` (the file
in the `image` metadata column), `GET /healthz`, `GET /` (page); every search route takes `index=NAME` when
several indexes are served (default: the first). The clip-retrieval back-end API (`/indices-list`,
`/knn-service`, `/metadata`) sits beside them (`clipretrieval`), under the same limits and key.
Results carry an allow-list of metadata columns: by default every column but the file paths.
Every error is `{"error": "..."}` JSON with a 4xx/5xx status; no traceback, path or repr leaves.

What bounds a hostile client: connections still sending headers are capped per client address and
overall (`connections`) and must finish within `header_timeout`; headers fit h11's 16 KiB event limit;
the body is counted while it streams (413 past `max_upload_bytes`, chunked too) and must arrive within
`body_timeout` (408); all bodies held at once stay under 8 caps (else 503); at most `max_concurrency`
searches run, others wait up to `queue_timeout` then get 503; images are decoded by allow-listed Pillow
plugins only, JPEGs at reduced scale, after a size check on the header, with their decode memory reserved
from one budget (`uploads`). Thumbnails open only regular files under the image roots (`files`).
"""
from __future__ import annotations

import asyncio
import ctypes
import functools
import io
import ipaddress
import logging
import os
import platform
import re
import socket
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import QueryParams, UploadFile
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware

from ..embed import Embedder
from ..search.filters import FilterError, Logic, Member, Node, parse_filter
from ..search.index import MAX_K, SearchIndex
from ..search.query import IMAGE_WEIGHT, Query, parse_query, query_vector
from ..model.transforms import BLOCKED_FORMATS
from .clipretrieval import KnnOptions, add_clip_retrieval_routes
from .connections import Pending, protocol_class
from .files import absolute_paths, find_image_roots, open_under
from .guard import ApiError, Guard, error_response, within
from .uploads import DECODE_BYTES_PER_PIXEL, DecodeBudget, decode_image

MiB = 1 << 20
STATIC = Path(__file__).with_name("static")
ASSETS = {"/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/static/app.css": ("app.css", "text/css; charset=utf-8")}
OPEN_PATHS = frozenset({"/", "/healthz", *ASSETS})  # served without the API key
QUERY_PARAMS = ("q", "k", "index", "negative", "image_weight")  # never metadata filters
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
THUMB_SIDE, THUMB_CACHE, THUMB_WAIT_S = 256, 512, 5.0
MAX_FILTER_VALUES = 100
IMAGE_COL = "image"  # the metadata column with each row's image file, as in pairs tables and collections
PATH_COLUMNS = ("image", "image_rel", "path", "filepath")  # hidden from results unless listed explicitly
MODEL_PIXELS = 64  # default max_pixels: this many times the model's image_size squared (at least 1 MP)
log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Limits:
    """Request limits of one app (see `create_app`). `max_pixels=None`: sized to the model."""

    max_upload_bytes: int = 8 * MiB
    max_pixels: int | None = None
    decode_memory: int = 256 * MiB  # bytes of image decoding in flight, all requests together
    max_k: int = 100
    max_query_chars: int = 1000
    max_concurrency: int = 4
    body_timeout: float = 10.0
    queue_timeout: float = 0.05
    allowed_formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP")

    def check(self) -> None:
        Image.init()
        bad = [f for f in self.allowed_formats if f not in Image.ID or f in BLOCKED_FORMATS]
        if bad:
            raise ValueError(f"allowed_formats: unknown or unsafe Pillow formats {bad}")
        ints = (self.max_upload_bytes, self.max_pixels or 1, self.decode_memory, self.max_k, self.max_query_chars,
                self.max_concurrency)
        if min(ints) < 1 or self.max_k > MAX_K or self.body_timeout <= 0 or self.queue_timeout < 0:
            raise ValueError(f"limits must be positive (and max_k <= {MAX_K}): {self}")


class _LockedTokenizer:
    """Serialises calls into a Hugging Face fast tokenizer: concurrent calls can raise "Already borrowed"
    (transformers#47085), and the search threads share one."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer, self._lock = tokenizer, threading.Lock()

    def __call__(self, texts: Any) -> Any:
        with self._lock:
            return self._tokenizer(texts)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)


def _result_columns(meta: pd.DataFrame, wanted: Iterable[str] | None) -> tuple[str, ...]:
    """The metadata columns results carry: `wanted` (checked), else all but the file-path columns."""
    if wanted is None:
        return tuple(c for c in meta.columns if c not in PATH_COLUMNS)
    wanted = tuple(wanted)
    missing = [c for c in wanted if c not in meta.columns]
    if missing:
        raise ValueError(f"result_columns {missing} are not metadata columns {list(meta.columns)}")
    return wanted


def _filterable(meta: pd.DataFrame, columns: Iterable[str]) -> dict[str, str]:
    """Result columns usable as exact-match query filters: name -> "str" | "int" | "bool"."""
    out = {}
    for col in columns:
        s = meta[col]
        if col in (*QUERY_PARAMS, "filter", "id", "score"):
            continue
        if pd.api.types.is_bool_dtype(s.dtype):
            out[col] = "bool"
        elif pd.api.types.is_integer_dtype(s.dtype):
            out[col] = "int"
        elif pd.api.types.is_string_dtype(s.dtype) and all(isinstance(v, str) for v in s.dropna()):
            out[col] = "str"
    return out


def _parse_k(raw: str | None, max_k: int) -> int:
    if raw is None:
        return min(10, max_k)
    if not re.fullmatch(r"[0-9]{1,7}", raw.strip()) or not 1 <= int(raw) <= max_k:
        raise ApiError(422, f"k must be an integer in 1..{max_k}")
    return int(raw)


def _single(params: QueryParams, name: str) -> str | None:
    values = params.getlist(name)
    if len(values) > 1:
        raise ApiError(400, f"parameter {name} given {len(values)} times")
    return values[0] if values else None


async def _acquire(sem: Any, timeout: float) -> bool:
    """Take a slot of the asyncio semaphore `sem`, waiting at most `timeout` seconds (0: only if free now)."""
    if not sem.locked():
        return await sem.acquire()  # returns at once, without yielding to other tasks
    try:
        return timeout > 0 and await within(sem.acquire(), timeout)
    except TimeoutError:
        return False


def load_embedder(model_dir: str | Path, precision: str = "auto") -> Embedder:
    """An Embedder whose tokenizer the search threads may share."""
    embedder = Embedder(model_dir, progress=False, precision=precision)
    embedder.tokenizer = _LockedTokenizer(embedder.tokenizer)
    return embedder


class Service:
    """One served index with its model, plus the request logic; searches run in worker threads. Services of
    one app share `share`'s search slots and decode budget (the limits hold for the server, not per index)."""

    def __init__(self, index_dir: str | Path, model_dir: str | Path, limits: Limits, *,
                 result_columns: Iterable[str] | None = None, image_roots: Iterable[str] | None = None,
                 name: str | None = None, embedder: Embedder | None = None, share: Service | None = None) -> None:
        self.index_dir = Path(index_dir)
        self.name = name or self.index_dir.resolve().name
        self.embedder = embedder if embedder is not None else load_embedder(model_dir)
        self.image_size = self.embedder.preprocess.cfg.image_size
        if limits.max_pixels is None:
            limits = _replace(limits, max_pixels=max(MODEL_PIXELS * self.image_size ** 2, 1_000_000))
        self.limits = limits
        self.index = SearchIndex.load(index_dir, expected_dim=self.embedder.dim)
        meta = self.index.metadata
        self.model_name = Path(model_dir).resolve().name
        self.columns = _result_columns(meta, result_columns)
        self.filters = _filterable(meta, self.columns)
        hidden = [c for c in meta.columns if c not in self.columns]
        log.info("results carry metadata columns %s%s", list(self.columns), f"; hidden: {hidden}" if hidden else "")
        paths = absolute_paths(meta[IMAGE_COL], self.index_dir) if IMAGE_COL in meta.columns else []
        self.roots = find_image_roots(paths, image_roots)
        if IMAGE_COL not in meta.columns:
            log.warning("index %s has no %r metadata column: /thumb answers 404", self.index_dir, IMAGE_COL)
        self.budget = DecodeBudget(limits.decode_memory) if share is None else share.budget
        self.slots = asyncio.Semaphore(limits.max_concurrency) if share is None else share.slots
        self.cached_thumb = functools.lru_cache(THUMB_CACHE)(self.make_thumb)  # errors are not cached
        self.thumb_slots = asyncio.Semaphore(max(2, limits.max_concurrency)) if share is None else share.thumb_slots

    def health(self) -> dict:
        return {"status": "ok", "count": len(self.index), "dim": self.index.dim, "model": self.model_name,
                "max_k": self.limits.max_k, "max_pixels": self.limits.max_pixels}

    def parse_filters(self, params: QueryParams, skip: Iterable[str]) -> Node | None:
        """Exact-match filters from query parameters named after result columns, and a `filter` string
        (same grammar as the library and the CLI), all and-ed; any other parameter is refused."""
        parts: list[Node] = []
        for name in dict.fromkeys(params.keys()):
            if name in skip:
                continue
            if name == "filter":
                parts.append(self._filter_string(_single(params, "filter") or ""))
                continue
            if name not in self.filters:
                raise ApiError(400, f"unknown parameter {name[:40]!r}; filterable: {sorted(self.filters)}")
            values = params.getlist(name)
            if len(values) > MAX_FILTER_VALUES or any(len(v) > self.limits.max_query_chars for v in values):
                raise ApiError(400, f"too many or too long values for {name}")
            parts.append(Member(name, tuple(self._cast(name, v) for v in values), False, 0))
        return None if not parts else parts[0] if len(parts) == 1 else Logic("and", tuple(parts))

    def _filter_string(self, text: str) -> Node:
        try:
            return parse_filter(text, columns=self.filters, max_chars=self.limits.max_query_chars)
        except FilterError as e:
            raise ApiError(400, f"invalid filter at position {e.position}: {e.reason}") from None  # no echo

    def _cast(self, name: str, value: str) -> Any:
        kind = self.filters[name]
        if kind == "int" and re.fullmatch(r"-?[0-9]{1,18}", value):
            return int(value)
        if kind == "bool" and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        if kind == "str":
            return value
        raise ApiError(400, f"filter {name} needs a {kind} value")

    async def limited(self, fn: Callable[[], T]) -> T:
        """Run `fn` in a worker thread once one of max_concurrency slots frees up within queue_timeout
        seconds, else answer 503 (so waiting, and latency, stay bounded)."""
        if not await _acquire(self.slots, self.limits.queue_timeout):
            raise ApiError(503, "server busy, retry shortly", {"retry-after": "1"})
        try:
            return await run_in_threadpool(fn)
        finally:
            self.slots.release()

    def decode(self, data: bytes) -> Image.Image:
        """An uploaded image, decoded under the limits (4xx ApiError otherwise)."""
        draft = self.image_size if self.embedder.preprocess.cfg.jpeg_draft else None  # as Preprocess decodes
        img, _ = decode_image(io.BytesIO(data), self.limits.allowed_formats, self.limits.max_pixels,
                              self.budget, self.limits.queue_timeout, draft=draft)
        return img

    def query_vector(self, text: str | None, image: bytes | None, negative: Iterable[str] = (),
                     image_weight: float = IMAGE_WEIGHT) -> Any:
        """The `[1, D]` vector of a text and/or uploaded-image query with negative terms (`search.query`)."""
        try:
            query = parse_query(text, None if image is None else b"", list(negative), image_weight)
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        pixels = None if image is None else self.decode(image)
        try:
            return query_vector(self.embedder, Query(query.text, pixels, query.negative, query.image_weight))
        except ValueError as e:  # `cat -cat`: no direction left
            raise ApiError(400, str(e).split(" (rows")[0]) from None

    def search_query(self, text: str | None, image: bytes | None, k: int, filters: Node | None,
                     negative: Iterable[str] = (), image_weight: float = IMAGE_WEIGHT) -> list[dict]:
        return self._search(self.query_vector(text, image, negative, image_weight), k, filters)

    def _search(self, query: Any, k: int, filters: Node | None) -> list[dict]:
        try:
            scores, ids = self.index.search(query, k, filter=filters)
        except ValueError:
            raise ApiError(400, "the query could not be searched") from None
        keep = ("id", "score", *self.columns)
        return [{c: hit[c] for c in keep if c in hit} for hit in self.index.results(scores, ids)[0]]

    def thumb_row(self, item_id: str) -> int:
        """Row number for `/thumb/{id}`: a live index row with an image path, else 404."""
        meta = self.index.metadata
        if not self.roots or not re.fullmatch(r"[0-9]{1,12}", item_id):
            raise ApiError(404, "no such image id")
        row = int(item_id)
        if row >= len(meta) or self.index.deleted[row] or not isinstance(meta[IMAGE_COL].iloc[row], str):
            raise ApiError(404, "no such image id")
        return row

    def make_thumb(self, row: int) -> tuple[bytes, str]:
        """Decode the indexed file (allowed formats, under the image roots), shrink it, re-encode it (drops EXIF)."""
        (path,) = absolute_paths(self.index.metadata[IMAGE_COL].iloc[row:row + 1], self.index_dir)
        f = open_under(path, self.roots)
        if f is None:
            raise ApiError(404, "image file unavailable")
        with f:
            img, fmt = decode_image(f, self.limits.allowed_formats, self.budget.limit // DECODE_BYTES_PER_PIXEL,
                                    self.budget, THUMB_WAIT_S, draft=THUMB_SIDE)
        img.thumbnail((THUMB_SIDE, THUMB_SIDE))
        buf, lossy = io.BytesIO(), fmt in ("JPEG", "WEBP")
        img.save(buf, "JPEG" if lossy else "PNG", **({"quality": 85} if lossy else {}))
        return buf.getvalue(), "image/jpeg" if lossy else "image/png"

    async def thumb(self, row: int) -> tuple[bytes, str]:
        """The cached thumbnail of `row`; decoding waits up to THUMB_WAIT_S for a slot, then 503."""
        if not await _acquire(self.thumb_slots, THUMB_WAIT_S):
            raise ApiError(503, "server busy, retry shortly", {"retry-after": "1"})
        try:
            return await run_in_threadpool(self.cached_thumb, row)
        finally:
            self.thumb_slots.release()


def _replace(limits: Limits, **changes: Any) -> Limits:
    return Limits(**{**{f.name: getattr(limits, f.name) for f in fields(Limits)}, **changes})


def load_services(index_dir: str | Path | Mapping[str, str | Path], model_dir: str | Path | Mapping[str, str | Path],
                  limits: Limits, precision: str = "auto", **options: Any) -> dict[str, Service]:
    """{name: Service}: one index folder (named after it) or {name: folder}; `model_dir` one model for all or
    {name: model}, run at `precision`. A model shared by several indexes is loaded once; the services share one
    set of limits."""
    indexes = dict(index_dir) if isinstance(index_dir, Mapping) else {Path(index_dir).resolve().name: index_dir}
    if not indexes or not all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", n) for n in indexes):
        raise ValueError(f"index names are 1-64 letters, digits, '.', '_' or '-': {list(indexes)}")
    models = dict(model_dir) if isinstance(model_dir, Mapping) else dict.fromkeys(indexes, model_dir)
    if set(models) != set(indexes):
        raise ValueError(f"give one model for every index: indexes {sorted(indexes)}, models {sorted(models)}")
    embedders: dict[Path, Embedder] = {}
    services: dict[str, Service] = {}
    for name, folder in indexes.items():
        key = Path(models[name]).resolve()
        if key not in embedders:
            embedders[key] = load_embedder(models[name], precision)
        services[name] = Service(folder, models[name], limits, name=name, embedder=embedders[key],
                                 share=next(iter(services.values()), None), **options)
    return services


def create_app(index_dir: str | Path | Mapping[str, str | Path], model_dir: str | Path | Mapping[str, str | Path], *,
               api_key: str | None = None, allowed_hosts: Iterable[str] | None = None,
               allow_origins: Iterable[str] = (), result_columns: Iterable[str] | None = None,
               image_roots: Iterable[str] | None = None, knn_images: bool = False, allow_image_url: bool = False,
               precision: str = "auto", **limits: Any) -> FastAPI:
    """The search app. Loads the models and the indexes now; any load error raises here (IndexLoadError,
    CheckpointError). `index_dir`: one folder, or {name: folder} to serve several (`model_dir`: one model,
    or {name: model}). `allowed_hosts=None` accepts loopback names only; `("*",)` accepts any Host.
    `result_columns`: the metadata columns results carry (default: all but the file paths);
    `image_roots`: folders thumbnails may come from (default: the folder holding all indexed images);
    `knn_images`, `allow_image_url`: the clip-retrieval API's `KnnOptions`; `precision`: the models' (`Embedder`'s);
    `limits`: fields of `Limits`."""
    limits_ = Limits(**{k: tuple(v) if k == "allowed_formats" else v for k, v in limits.items()})
    limits_.check()
    if api_key is not None and not api_key:
        raise ValueError("api_key must be a non-empty string or None")
    hosts = frozenset(h.lower() for h in (LOOPBACK_NAMES if allowed_hosts is None else allowed_hosts))
    page = {p: ((STATIC / f).read_bytes(), t) for p, (f, t) in ASSETS.items()}
    index_html = (STATIC / "index.html").read_bytes()
    services = load_services(index_dir, model_dir, limits_, precision, result_columns=result_columns,
                             image_roots=image_roots)
    app = FastAPI(title="clipkit search", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.services = services
    app.state.service = next(iter(services.values()))  # the default index
    _add_error_handlers(app)
    _add_routes(app, services, index_html, page)
    add_clip_retrieval_routes(app, services, KnnOptions(images=knn_images, image_url=allow_image_url))
    app.add_middleware(Guard, hosts=None if "*" in hosts else hosts, key=api_key,
                       max_body=limits_.max_upload_bytes, body_timeout=limits_.body_timeout, open_paths=OPEN_PATHS)
    if tuple(allow_origins):  # added last: outermost, so it answers preflights
        app.add_middleware(CORSMiddleware, allow_origins=list(allow_origins), allow_methods=["GET", "POST"],
                           allow_headers=["X-API-Key", "Authorization"])
    return app


def _add_error_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.headers)

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else "bad request"
        return error_response(exc.status_code, detail.lower(), getattr(exc, "headers", None))

    async def crash(request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error on %s", request.url.path, exc_info=exc)
        return error_response(500, "internal server error")

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, crash)


def _asset(data: bytes, media_type: str) -> Callable:
    async def serve() -> Response:
        return Response(data, media_type=media_type)
    return serve


def pick_service(services: Mapping[str, Service], name: str | None) -> Service:
    """The service called `name`, the first one when None; 404 for an unknown name."""
    if name is None:
        return next(iter(services.values()))
    if not isinstance(name, str) or name not in services:
        raise ApiError(404, f"unknown index; served: {sorted(services)}")
    return services[name]


def _weight(raw: str | None) -> float:
    if raw is None:
        return IMAGE_WEIGHT
    if not re.fullmatch(r"(0(\.[0-9]{1,6})?|1(\.0{1,6})?)", raw.strip()):
        raise ApiError(422, "image_weight must be a number in 0..1")
    return float(raw)


def _text(svc: Service, raw: str | None, required: bool) -> str | None:
    q = (raw or "").strip()
    if not q and required:
        raise ApiError(400, "empty query: pass q=<text>, or POST an image")
    if len(q) > svc.limits.max_query_chars:
        raise ApiError(400, f"query longer than {svc.limits.max_query_chars} characters")
    return q or None


def _negatives(svc: Service, params: QueryParams) -> list[str]:
    values = params.getlist("negative")
    if len(values) > MAX_FILTER_VALUES or sum(map(len, values)) > svc.limits.max_query_chars:
        raise ApiError(400, "too many or too long negative terms")
    return values


async def _image_form(request: Request) -> tuple[bytes, dict[str, str]]:
    """The uploaded `file` and the short text fields of a multipart POST."""
    if not (request.headers.get("content-type") or "").lower().startswith("multipart/form-data"):
        raise ApiError(415, "POST /search takes multipart/form-data with an image in the 'file' field")
    form = await request.form(max_files=1, max_fields=16, max_part_size=64 * 1024)
    try:  # other form fields (image_url, path, ...) are ignored: nothing is fetched or opened
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ApiError(400, "missing image: upload it in the 'file' field")
        fields = {k: v for k, v in form.items() if isinstance(v, str) and k in ("q", "k", "image_weight")}
        data = await upload.read()
    finally:
        await form.close()
    if not data:
        raise ApiError(400, "the uploaded file is empty")
    return data, fields


def _add_routes(app: FastAPI, services: Mapping[str, Service], index_html: bytes, assets: dict) -> None:
    @app.get("/", response_class=HTMLResponse)
    async def page() -> Response:
        return Response(index_html, media_type="text/html; charset=utf-8")

    for route, (data, media_type) in assets.items():
        app.add_api_route(route, _asset(data, media_type), methods=["GET"])

    @app.get("/healthz")
    async def healthz(request: Request) -> dict:
        svc = pick_service(services, _single(request.query_params, "index"))
        return {**svc.health(), "index": svc.name, "indexes": list(services)}

    @app.get("/search")
    async def search_text(request: Request) -> Response:
        params = request.query_params
        svc = pick_service(services, _single(params, "index"))
        q = _text(svc, _single(params, "q"), required=True)
        k = _parse_k(_single(params, "k"), svc.limits.max_k)
        negative = _negatives(svc, params)
        filters = svc.parse_filters(params, skip=("q", "k", "index", "negative"))
        return JSONResponse({"results": await svc.limited(lambda: svc.search_query(q, None, k, filters, negative))})

    @app.post("/search")
    async def search_image(request: Request) -> Response:
        params = request.query_params
        svc = pick_service(services, _single(params, "index"))
        data, form = await _image_form(request)
        k = _parse_k(form.get("k", _single(params, "k")), svc.limits.max_k)
        q = _text(svc, form.get("q", _single(params, "q")), required=False)
        weight = _weight(form.get("image_weight", _single(params, "image_weight")))
        negative = _negatives(svc, params)
        filters = svc.parse_filters(params, skip=QUERY_PARAMS)
        return JSONResponse({"results": await svc.limited(
            lambda: svc.search_query(q, data, k, filters, negative, weight))})

    @app.get("/thumb/{item_id}")
    async def thumb(item_id: str, request: Request) -> Response:
        svc = pick_service(services, _single(request.query_params, "index"))
        data, media_type = await svc.thumb(svc.thumb_row(item_id))
        return Response(data, media_type=media_type, headers={"cache-control": "private, max-age=3600"})


def _bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(addr)
    sock.listen(1024)
    return sock


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost: addresses other machines cannot reach."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def check_exposure(host: str, api_key: str | None, insecure_no_auth: bool) -> None:
    """Refuse a non-loopback bind without an API key: anyone on the network could search and read
    thumbnails, and with no Host check a web page could reach it through DNS rebinding."""
    if is_loopback(host) or api_key is not None:
        return
    if not insecure_no_auth:
        raise ValueError(f"refusing to serve on {host} without an API key: anyone who can reach it could "
                         "search it. Pass --api-key-file FILE or set CLIPKIT_API_KEY (or api_key=), or "
                         "--insecure-no-auth (insecure_no_auth=True) when a proxy in front authenticates")
    log.warning("serving on %s with no API key (--insecure-no-auth): every client that reaches it can search", host)


def configure_threads(max_concurrency: int, threads: int | None = None) -> int:
    """Threads per search for torch and FAISS: the CPUs shared among `max_concurrency` searches, so
    concurrent searches do not each spin up every core. Returns the count set."""
    import faiss
    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    n = threads or max(1, cpus // max_concurrency)
    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)
    return n


def _return_freed_memory() -> None:
    """Make glibc hand large freed blocks (decoded images) back to the OS: with its default, adaptive mmap
    threshold, 16 MiB image blocks end up in arenas that are never trimmed, so RSS only grows."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    m_mmap_threshold = -3
    ctypes.CDLL(None).mallopt(m_mmap_threshold, 1 * MiB)


def run_server(index_dir: str | Path, model_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000,
               api_key: str | None = None, insecure_no_auth: bool = False, timeout_keep_alive: int = 5,
               header_timeout: float = 5.0, max_connections: int = 512, max_pending_per_client: int = 16,
               max_pending: int = 128, threads_per_search: int | None = None, access_log: bool = False,
               on_ready: Callable[[str], None] | None = None, **options: Any) -> None:
    """Load, bind, call `on_ready("http://HOST:PORT")` (else log it), serve until SIGINT/SIGTERM. Port 0 picks
    a free port. Load errors raise before the port is bound. A non-loopback `host` needs `api_key` (or
    `insecure_no_auth=True`) and then accepts any Host unless `allowed_hosts` is given. `options` go to
    `create_app` (`Limits` fields, result_columns, image_roots, allowed_hosts, allow_origins, knn_images,
    allow_image_url, precision);
    `index_dir` / `model_dir` may be {name: folder} mappings to serve several indexes."""
    import uvicorn

    check_exposure(host, api_key, insecure_no_auth)
    if not is_loopback(host):
        options.setdefault("allowed_hosts", ("*",))
    _return_freed_memory()
    configure_threads(options.get("max_concurrency", Limits.max_concurrency), threads_per_search)
    app = create_app(index_dir, model_dir, api_key=api_key, **options)
    sock = _bind(host, port)
    pending = Pending(per_client=max_pending_per_client, total=max_pending)
    config = uvicorn.Config(
        app, http=protocol_class(header_timeout, pending), ws="none", lifespan="off",
        timeout_keep_alive=timeout_keep_alive, h11_max_incomplete_event_size=16 * 1024,
        limit_concurrency=max_connections, access_log=access_log, proxy_headers=False, server_header=False,
        timeout_graceful_shutdown=5, log_level="warning")
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{sock.getsockname()[1]}"
    on_ready(url) if on_ready is not None else log.warning("listening on %s", url)
    uvicorn.Server(config).run(sockets=[sock])
