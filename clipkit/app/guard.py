"""The service's outer ASGI layer: Host allow-list, API key, security headers, bounded request bodies.

Also the one error type the routes raise (`ApiError`) and `within`, the timeout helper that reads the
same on every Python: before 3.11 `asyncio.TimeoutError` is not the builtin `TimeoutError`.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from fastapi.responses import JSONResponse

CSP = ("default-src 'self'; img-src 'self' blob:; object-src 'none'; base-uri 'none'; "
       "frame-ancestors 'none'; form-action 'self'")
SECURITY_HEADERS = ((b"x-content-type-options", b"nosniff"), (b"content-security-policy", CSP.encode()),
                    (b"x-frame-options", b"DENY"), (b"referrer-policy", b"no-referrer"),
                    (b"cache-control", b"no-store"))
BUFFERED_BODIES = 8  # request bodies held in memory at once, at most, in units of max_upload_bytes
T = TypeVar("T")


class ApiError(Exception):
    """An error answered as `{"error": message}` with `status` (and optional extra headers)."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, dict(headers or {})


def error_response(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=dict(headers or {}))


async def within(awaitable: Awaitable[T], seconds: float) -> T:
    """`asyncio.wait_for`, raising the builtin TimeoutError on expiry on every Python (3.10 too)."""
    try:
        return await asyncio.wait_for(awaitable, seconds)
    except (asyncio.TimeoutError, TimeoutError):  # two classes before Python 3.11, one after
        raise TimeoutError from None


def header(scope: dict, name: bytes) -> str | None:
    """First value of a request header, as latin-1 text."""
    return next((v.decode("latin-1") for k, v in scope["headers"] if k == name), None)


def host_name(host: str) -> str:
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
                 body_timeout: float, open_paths: frozenset[str] = frozenset()) -> None:
        self.app, self.hosts, self.max_body, self.body_timeout = app, hosts, max_body, body_timeout
        self.open_paths = open_paths  # served without the API key
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
                await error_response(status, msg, headers)(scope, receive, send)
        finally:
            self.buffered -= held[0]
        return None

    def _check(self, scope: dict) -> tuple[int, str, dict] | None:
        host = header(scope, b"host")
        if self.hosts is not None and (host is None or host_name(host) not in self.hosts):
            return 400, "invalid Host header", {}
        if self.key_digest is not None and scope["path"] not in self.open_paths and not self._authorized(scope):
            return 401, "missing or wrong API key (X-API-Key or Authorization: Bearer)", {
                "www-authenticate": "Bearer"}
        length = header(scope, b"content-length")
        if length is not None and not length.isdigit():
            return 400, "invalid Content-Length", {"connection": "close"}
        return None

    def _authorized(self, scope: dict) -> bool:
        """X-API-Key, `Authorization: Bearer KEY`, or Basic auth with the key as password (what `requests` sends
        for `http://user:KEY@host/`: clip-retrieval's ClipClient can send no header of its own)."""
        given = header(scope, b"x-api-key")
        auth = header(scope, b"authorization") or ""
        if given is None and auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        elif given is None and auth[:6].lower() == "basic ":
            try:
                given = base64.b64decode(auth[6:].strip(), validate=True).decode("utf-8").partition(":")[2]
            except (ValueError, UnicodeDecodeError):
                return False
        return given is not None and hmac.compare_digest(_digest(given), self.key_digest)

    async def _read_body(self, scope: dict, receive: Callable, held: list[int]
                         ) -> bytes | tuple[int, str, dict] | None:
        """The whole body, or an error: 413 past the cap (after draining up to one more cap, so the
        client can read the answer), 408 past the deadline, 503 when all requests together hold
        `max_buffered` bytes; None if the client disconnected. `held[0]` counts what this one holds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout
        declared = int(header(scope, b"content-length") or 0)
        too_big = declared > self.max_body
        if declared > 2 * self.max_body:  # too much to drain: answer now
            return 413, f"request body exceeds {self.max_body} bytes", {"connection": "close"}
        chunks, size, more = [], 0, True
        while more and size <= 2 * self.max_body:
            try:
                msg = await within(receive(), max(deadline - loop.time(), 0.001))
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
