"""HTTP search service: a FastAPI app over one SearchIndex + Embedder, and a hardened uvicorn runner.

Routes: `GET /search?q=&k=` (text; exact-match filters on metadata columns, e.g. `&style=emoji`),
`POST /search` (multipart `file` image, optional `k`), `GET /thumb/{id}` (the file in the `image`
metadata column), `GET /healthz`, `GET /` (page).
Every error is `{"error": "..."}` JSON with a 4xx/5xx status; no traceback, path or repr leaves.

What bounds a hostile client: request headers must arrive within `header_timeout` and fit h11's
16 KiB event limit; the body is counted while it streams (413 past `max_upload_bytes`, chunked too)
and must arrive within `body_timeout` (408); all bodies held at once stay under 8 caps (else 503);
idle keep-alive connections close after `timeout_keep_alive`; at most `max_connections` connections;
at most `max_concurrency` searches run, others wait up to `queue_timeout` then get 503; images are
decoded by allow-listed Pillow plugins only, after a `max_pixels` check on the header.
"""
from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import io
import logging
import re
import socket
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image, UnidentifiedImageError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import QueryParams, UploadFile
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware

from ..embed import Embedder
from ..errors import ImageLoadError
from ..search.index import MAX_K, SearchIndex
from ..model.transforms import BLOCKED_FORMATS, load_image

MiB = 1 << 20
STATIC = Path(__file__).with_name("static")
ASSETS = {"/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/static/app.css": ("app.css", "text/css; charset=utf-8")}
OPEN_PATHS = frozenset({"/", "/healthz", *ASSETS})  # served without the API key
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
CSP = ("default-src 'self'; img-src 'self' blob:; object-src 'none'; base-uri 'none'; "
       "frame-ancestors 'none'; form-action 'self'")
SECURITY_HEADERS = ((b"x-content-type-options", b"nosniff"), (b"content-security-policy", CSP.encode()),
                    (b"x-frame-options", b"DENY"), (b"referrer-policy", b"no-referrer"),
                    (b"cache-control", b"no-store"))
THUMB_SIDE, THUMB_CACHE, THUMB_WAIT_S = 256, 512, 5.0
MAX_FILTER_VALUES = 100
IMAGE_COL = "image"  # the metadata column with each row's image file, as in pairs tables and collections
BUFFERED_BODIES = 8  # request bodies held in memory at once, at most, in units of max_upload_bytes
_MAGIC = ((b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"%!PS", "EPS"), (b"\xc5\xd0\xd3\xc6", "EPS"),
          (b"%PDF", "PDF"), (b"8BPS", "PSD"), (b"\x00\x00\x01\x00", "ICO"), (b"\xff\xd8\xff", "JPEG"),
          (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF8", "GIF"), (b"BM", "BMP"))
log = logging.getLogger(__name__)
T = TypeVar("T")


class ApiError(Exception):
    """An error answered as `{"error": message}` with `status` (and optional extra headers)."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, dict(headers or {})


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=dict(headers or {}))


@dataclass(frozen=True)
class Limits:
    """Request limits of one app (see `create_app`)."""

    max_upload_bytes: int = 8 * MiB
    max_pixels: int = 40_000_000
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
        ints = (self.max_upload_bytes, self.max_pixels, self.max_k, self.max_query_chars, self.max_concurrency)
        if min(ints) < 1 or self.max_k > MAX_K or self.body_timeout <= 0 or self.queue_timeout < 0:
            raise ValueError(f"limits must be positive (and max_k <= {MAX_K}): {self}")


def _header(scope: dict, name: bytes) -> str | None:
    """First value of a request header, as latin-1 text."""
    return next((v.decode("latin-1") for k, v in scope["headers"] if k == name), None)


def _host_name(host: str) -> str:
    """`Host` header -> lower-case host name without port (`[::1]:80` -> `::1`)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


class Guard:
    """Pure ASGI middleware: Host allow-list, API key, security headers, and the request body read in
    full under a byte cap and a deadline before the app runs (so parsers never see an oversized body)."""

    def __init__(self, app: Any, *, hosts: frozenset[str] | None, key: str | None, max_body: int,
                 body_timeout: float) -> None:
        self.app, self.hosts, self.max_body, self.body_timeout = app, hosts, max_body, body_timeout
        self.key_digest = None if key is None else _digest(key)
        self.buffered, self.max_buffered = 0, BUFFERED_BODIES * max_body  # bytes held by all requests

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        send, held = _secured(send), [0]
        try:
            outcome = self._check(scope) or await self._read_body(scope, receive, held)
            if isinstance(outcome, bytes):
                return await self.app(scope, _replay(outcome, receive), send)
            if outcome is not None:  # None: the client went away mid-body
                status, msg, headers = outcome
                await _error(status, msg, headers)(scope, receive, send)
        finally:
            self.buffered -= held[0]
        return None

    def _check(self, scope: dict) -> tuple[int, str, dict] | None:
        host = _header(scope, b"host")
        if self.hosts is not None and (host is None or _host_name(host) not in self.hosts):
            return 400, "invalid Host header", {}
        if self.key_digest is not None and scope["path"] not in OPEN_PATHS and not self._authorized(scope):
            return 401, "missing or wrong API key (X-API-Key or Authorization: Bearer)", {
                "www-authenticate": "Bearer"}
        length = _header(scope, b"content-length")
        if length is not None and not length.isdigit():
            return 400, "invalid Content-Length", {"connection": "close"}
        return None

    def _authorized(self, scope: dict) -> bool:
        given = _header(scope, b"x-api-key")
        auth = _header(scope, b"authorization") or ""
        if given is None and auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        return given is not None and hmac.compare_digest(_digest(given), self.key_digest)

    async def _read_body(self, scope: dict, receive: Callable, held: list[int]
                         ) -> bytes | tuple[int, str, dict] | None:
        """The whole body, or an error: 413 past the cap (after draining up to one more cap, so the
        client can read the answer), 408 past the deadline, 503 when all requests together hold
        `max_buffered` bytes; None if the client disconnected. `held[0]` counts what this one holds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout
        declared = int(_header(scope, b"content-length") or 0)
        too_big = declared > self.max_body
        if declared > 2 * self.max_body:  # too much to drain: answer now
            return 413, f"request body exceeds {self.max_body} bytes", {"connection": "close"}
        chunks, size, more = [], 0, True
        while more and size <= 2 * self.max_body:
            try:
                msg = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.001))
            except TimeoutError:
                return 408, f"request body not received within {self.body_timeout:g} s", {"connection": "close"}
            if msg["type"] == "http.disconnect":
                return None
            part, more = msg.get("body", b""), msg.get("more_body", False)
            size += len(part)
            too_big = too_big or size > self.max_body
            if not too_big and self.buffered + len(part) > self.max_buffered:
                return 503, "server busy, retry shortly", {"connection": "close", "retry-after": "1"}
            if not too_big:
                chunks.append(part)
                held[0] += len(part)
                self.buffered += len(part)
        if too_big:
            return 413, f"request body exceeds {self.max_body} bytes", {"connection": "close"}
        return b"".join(chunks)


def _secured(send: Callable) -> Callable:
    """Wrap `send` to add the security headers a response does not set itself."""
    async def wrapped(message: dict) -> None:
        if message["type"] == "http.response.start":
            headers = list(message.get("headers", []))
            have = {k.lower() for k, _ in headers}
            message = {**message, "headers": headers + [(k, v) for k, v in SECURITY_HEADERS if k not in have]}
        await send(message)
    return wrapped


def _replay(body: bytes, receive: Callable) -> Callable:
    """A `receive` that yields the buffered body once, then defers to the server (disconnects)."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return replay


def _sniff(head: bytes) -> str | None:
    """Format name from magic bytes, only to tell 'not allowed' (415) from 'corrupt' (400)."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    text = head[:512].lstrip().lower()
    if text.startswith(b"<?xml") or b"<svg" in text:
        return "SVG"
    return next((name for magic, name in _MAGIC if head.startswith(magic)), None)


def decode_image(fp: Any, allowed: tuple[str, ...], max_pixels: int, draft: int | None = None
                 ) -> tuple[Image.Image, str]:
    """Open `fp` with only the allowed decoders, check the pixel cap from the header, decode to RGB."""
    try:
        img = Image.open(fp, formats=list(allowed))
    except Image.DecompressionBombError:
        raise ApiError(413, f"image too large (more than {max_pixels} pixels)") from None
    except UnidentifiedImageError:
        fp.seek(0)
        fmt = _sniff(fp.read(1024))
        if fmt in allowed:
            raise ApiError(400, f"corrupt {fmt} image header") from None
        raise ApiError(415, f"unsupported image format {fmt or '(unrecognised)'}; "
                            f"accepted: {', '.join(allowed)}") from None
    except Exception:
        raise ApiError(400, "corrupt image header") from None
    with img:
        fmt = img.format or "?"
        if draft and fmt == "JPEG":
            img.draft("RGB", (draft, draft))
        try:
            out = load_image(img, max_pixels=max_pixels)
        except ImageLoadError as e:
            if e.reason == "too_large":
                raise ApiError(413, f"image too large: {e.detail}") from None
            raise ApiError(400, f"truncated or corrupt {fmt} image") from None
        return (out.copy() if out is img else out), fmt  # close() would invalidate `img`


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


def _filterable(meta: pd.DataFrame) -> dict[str, str]:
    """Metadata columns usable as exact-match query filters: name -> "str" | "int" | "bool"."""
    out = {}
    for col in meta.columns:
        s = meta[col]
        if col in ("q", "k", "id", "score"):
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


async def _acquire(sem: asyncio.Semaphore, timeout: float) -> bool:
    """Take a slot of `sem`, waiting at most `timeout` seconds (0: only if one is free now)."""
    if not sem.locked():
        return await sem.acquire()  # returns at once, without yielding to other tasks
    try:
        return timeout > 0 and await asyncio.wait_for(sem.acquire(), timeout)
    except TimeoutError:
        return False


class Service:
    """The loaded model and index plus the request logic; searches run in worker threads."""

    def __init__(self, index_dir: str | Path, model_dir: str | Path, limits: Limits) -> None:
        self.limits, self.index_dir = limits, Path(index_dir)
        self.embedder = Embedder(model_dir, progress=False)
        self.embedder.tokenizer = _LockedTokenizer(self.embedder.tokenizer)
        self.index = SearchIndex.load(index_dir, expected_dim=self.embedder.dim)
        self.model_name = Path(model_dir).resolve().name
        self.filters = _filterable(self.index.metadata)
        self.has_images = IMAGE_COL in self.index.metadata.columns
        if not self.has_images:
            log.warning("index %s has no %r metadata column: /thumb answers 404", self.index_dir, IMAGE_COL)
        self.slots = asyncio.Semaphore(limits.max_concurrency)
        self.cached_thumb = functools.lru_cache(THUMB_CACHE)(self.make_thumb)  # errors are not cached
        self.thumb_slots = asyncio.Semaphore(max(2, limits.max_concurrency))

    def health(self) -> dict:
        return {"status": "ok", "count": len(self.index), "dim": self.index.dim, "model": self.model_name,
                "max_k": self.limits.max_k}

    def parse_filters(self, params: QueryParams, skip: Iterable[str]) -> dict | None:
        """Exact-match filters from query parameters named after metadata columns; others are refused."""
        out: dict[str, list] = {}
        for name in dict.fromkeys(params.keys()):
            if name in skip:
                continue
            if name not in self.filters:
                raise ApiError(400, f"unknown parameter {name[:40]!r}; filterable: {sorted(self.filters)}")
            values = params.getlist(name)
            if len(values) > MAX_FILTER_VALUES or any(len(v) > self.limits.max_query_chars for v in values):
                raise ApiError(400, f"too many or too long values for {name}")
            out[name] = [self._cast(name, v) for v in values]
        return out or None

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

    def search_text(self, q: str, k: int, filters: dict | None) -> list[dict]:
        return self._search(self.embedder.texts([q]), k, filters)

    def search_image(self, data: bytes, k: int, filters: dict | None) -> list[dict]:
        img, _ = decode_image(io.BytesIO(data), self.limits.allowed_formats, self.limits.max_pixels)
        return self._search(self.embedder.images([img]), k, filters)

    def _search(self, query: Any, k: int, filters: dict | None) -> list[dict]:
        try:
            scores, ids = self.index.search(query, k, filter=filters)
        except ValueError:
            raise ApiError(400, "the query could not be searched") from None
        return self.index.results(scores, ids)[0]

    def thumb_row(self, item_id: str) -> int:
        """Row number for `/thumb/{id}`: a live index row with an image path, else 404."""
        meta = self.index.metadata
        if not self.has_images or not re.fullmatch(r"[0-9]{1,12}", item_id):
            raise ApiError(404, "no such image id")
        row = int(item_id)
        if row >= len(meta) or self.index.deleted[row] or not isinstance(meta[IMAGE_COL].iloc[row], str):
            raise ApiError(404, "no such image id")
        return row

    def make_thumb(self, row: int) -> tuple[bytes, str]:
        """Decode the indexed file (allowed formats only), shrink it, re-encode it (drops EXIF)."""
        path = Path(self.index.metadata[IMAGE_COL].iloc[row])
        path = path if path.is_absolute() else self.index_dir / path
        try:
            f = open(path, "rb")
        except OSError:
            raise ApiError(404, "image file unavailable") from None
        with f:
            img, fmt = decode_image(f, self.limits.allowed_formats, self.limits.max_pixels, draft=THUMB_SIDE)
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


def create_app(index_dir: str | Path, model_dir: str | Path, *, api_key: str | None = None,
               max_upload_bytes: int = 8 * MiB, max_pixels: int = 40_000_000, max_k: int = 100,
               max_query_chars: int = 1000, max_concurrency: int = 4, queue_timeout: float = 0.05,
               body_timeout: float = 10.0, allowed_hosts: Iterable[str] | None = None,
               allow_origins: Iterable[str] = (),
               allowed_formats: Iterable[str] = ("JPEG", "PNG", "WEBP", "GIF", "BMP")) -> FastAPI:
    """The search app. Loads the model and the index now; any load error raises here (IndexLoadError,
    CheckpointError). `allowed_hosts=None` accepts loopback names only; `("*",)` accepts any Host."""
    limits = Limits(max_upload_bytes, max_pixels, max_k, max_query_chars, max_concurrency, body_timeout,
                    queue_timeout, tuple(allowed_formats))
    limits.check()
    if api_key is not None and not api_key:
        raise ValueError("api_key must be a non-empty string or None")
    hosts = frozenset(h.lower() for h in (LOOPBACK_NAMES if allowed_hosts is None else allowed_hosts))
    page = {p: ((STATIC / f).read_bytes(), t) for p, (f, t) in ASSETS.items()}
    index_html = (STATIC / "index.html").read_bytes()
    svc = Service(index_dir, model_dir, limits)
    app = FastAPI(title="clipkit search", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = svc
    _add_error_handlers(app)
    _add_routes(app, svc, index_html, page)
    app.add_middleware(Guard, hosts=None if "*" in hosts else hosts, key=api_key,
                       max_body=max_upload_bytes, body_timeout=body_timeout)
    if tuple(allow_origins):  # added last: outermost, so it answers preflights
        app.add_middleware(CORSMiddleware, allow_origins=list(allow_origins), allow_methods=["GET", "POST"],
                           allow_headers=["X-API-Key", "Authorization"])
    return app


def _add_error_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.headers)

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else "bad request"
        return _error(exc.status_code, detail.lower(), getattr(exc, "headers", None))

    async def crash(request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error on %s", request.url.path, exc_info=exc)
        return _error(500, "internal server error")

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, crash)


def _asset(data: bytes, media_type: str) -> Callable:
    async def serve() -> Response:
        return Response(data, media_type=media_type)
    return serve


def _add_routes(app: FastAPI, svc: Service, index_html: bytes, assets: dict) -> None:
    @app.get("/", response_class=HTMLResponse)
    async def page() -> Response:
        return Response(index_html, media_type="text/html; charset=utf-8")

    for route, (data, media_type) in assets.items():
        app.add_api_route(route, _asset(data, media_type), methods=["GET"])

    @app.get("/healthz")
    async def healthz() -> dict:
        return svc.health()

    @app.get("/search")
    async def search_text(request: Request) -> Response:
        params = request.query_params
        q = (_single(params, "q") or "").strip()
        if not q:
            raise ApiError(400, "empty query: pass q=<text>, or POST an image")
        if len(q) > svc.limits.max_query_chars:
            raise ApiError(400, f"query longer than {svc.limits.max_query_chars} characters")
        k = _parse_k(_single(params, "k"), svc.limits.max_k)
        filters = svc.parse_filters(params, skip=("q", "k"))
        return JSONResponse({"results": await svc.limited(lambda: svc.search_text(q, k, filters))})

    @app.post("/search")
    async def search_image(request: Request) -> Response:
        if not (request.headers.get("content-type") or "").lower().startswith("multipart/form-data"):
            raise ApiError(415, "POST /search takes multipart/form-data with an image in the 'file' field")
        form = await request.form(max_files=1, max_fields=16, max_part_size=64 * 1024)
        try:  # other form fields (image_url, path, ...) are ignored: nothing is fetched or opened
            upload, k_field = form.get("file"), form.get("k")
            if not isinstance(upload, UploadFile):
                raise ApiError(400, "missing image: upload it in the 'file' field")
            data = await upload.read()
        finally:
            await form.close()
        k_raw = k_field if isinstance(k_field, str) else _single(request.query_params, "k")
        k = _parse_k(k_raw, svc.limits.max_k)
        filters = svc.parse_filters(request.query_params, skip=("k",))
        if not data:
            raise ApiError(400, "the uploaded file is empty")
        return JSONResponse({"results": await svc.limited(lambda: svc.search_image(data, k, filters))})

    @app.get("/thumb/{item_id}")
    async def thumb(item_id: str) -> Response:
        data, media_type = await svc.thumb(svc.thumb_row(item_id))
        return Response(data, media_type=media_type, headers={"cache-control": "private, max-age=3600"})


def _protocol(header_timeout: float) -> type:
    """uvicorn's h11 protocol plus a header deadline (uvicorn has none: a slowloris would hold forever)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def _arm(self) -> None:
            cycle = self.cycle  # a new request replaces it; then the deadline is void

            def expire() -> None:
                idle = cycle is None or cycle.response_complete
                if self.cycle is cycle and idle and not self.transport.is_closing():
                    self.transport.close()
            self.loop.call_later(header_timeout, expire)

    return Protocol


def _bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(addr)
    sock.listen(1024)
    return sock


def _is_loopback(host: str) -> bool:
    return host in LOOPBACK_NAMES or host.startswith("127.")


def run_server(index_dir: str | Path, model_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000,
               api_key: str | None = None, timeout_keep_alive: int = 5, header_timeout: float = 10.0,
               max_connections: int = 256, access_log: bool = False,
               on_ready: Callable[[str], None] | None = None, **limits: Any) -> None:
    """Load, bind, call `on_ready("http://HOST:PORT")` (else log it), serve until SIGINT/SIGTERM. Port 0 picks
    a free port. Load errors raise before the port is bound. `limits` go to `create_app`; a server
    bound beyond loopback accepts any Host unless `allowed_hosts` is given."""
    import uvicorn

    if not _is_loopback(host):
        limits.setdefault("allowed_hosts", ("*",))
    app = create_app(index_dir, model_dir, api_key=api_key, **limits)
    sock = _bind(host, port)
    config = uvicorn.Config(
        app, http=_protocol(header_timeout), ws="none", lifespan="off", timeout_keep_alive=timeout_keep_alive,
        h11_max_incomplete_event_size=16 * 1024, limit_concurrency=max_connections, access_log=access_log,
        proxy_headers=False, server_header=False, timeout_graceful_shutdown=5, log_level="warning")
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{sock.getsockname()[1]}"
    on_ready(url) if on_ready is not None else log.warning("listening on %s", url)
    uvicorn.Server(config).run(sockets=[sock])
