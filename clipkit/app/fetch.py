"""Fetching the image of a client-named URL (clip-retrieval's `image_url`): off unless `--allow-image-url`.

Only `http`/`https` URLs of public addresses: the host is resolved once, every address it resolves to must be
public (not loopback, private, link-local like 169.254.169.254, multicast or reserved), and the connection goes
to that checked address, so DNS cannot rebind between the check and the connect (TLS still verifies the host
name). Redirects are not followed (one would need the same checks again), and the body is capped at
`max_bytes` and the whole fetch at `timeout` seconds. Errors are 400s that name no internal detail.
"""
from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
from urllib.parse import urlsplit

from .guard import ApiError

CHUNK = 64 * 1024


def is_public(address: str) -> bool:
    return ipaddress.ip_address(address.split("%", 1)[0]).is_global


def _checked_address(host: str, port: int) -> str:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise ApiError(400, "image_url: the host does not resolve") from None
    addresses = sorted({info[4][0] for info in infos})
    if not addresses or not all(is_public(a) for a in addresses):
        raise ApiError(400, "image_url: only public addresses are fetched")
    return addresses[0]


class _Pinned(http.client.HTTPSConnection):
    """An HTTP(S) connection to one checked address; the URL's host name goes in Host and TLS SNI."""

    def __init__(self, host: str, address: str, port: int, timeout: float, tls: bool) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self.address, self.tls = address, tls

    def connect(self) -> None:
        sock = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host) if self.tls else sock


def fetch_image_url(url: str, max_bytes: int, timeout: float = 5.0) -> bytes:
    """The body of a GET of `url` under the rules above (ApiError 400 otherwise)."""
    parts = urlsplit(url) if isinstance(url, str) and len(url) <= 2048 else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ApiError(400, "image_url must be an http(s) URL")
    tls = parts.scheme == "https"
    try:
        port = parts.port or (443 if tls else 80)
    except ValueError:
        raise ApiError(400, "image_url has a bad port") from None
    conn = _Pinned(parts.hostname, _checked_address(parts.hostname, port), port, timeout, tls)
    deadline = time.monotonic() + timeout
    try:
        conn.request("GET", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
                     headers={"User-Agent": "clipkit", "Accept": "image/*"})
        response = conn.getresponse()
        if response.status != 200:
            raise ApiError(400, f"image_url answered HTTP {response.status} (redirects are not followed)")
        body = bytearray()
        while chunk := response.read(CHUNK):
            body += chunk
            if len(body) > max_bytes or time.monotonic() > deadline:
                raise ApiError(400, f"image_url: more than {max_bytes} bytes or {timeout:g} s")
        return bytes(body)
    except (OSError, http.client.HTTPException):
        raise ApiError(400, "image_url could not be fetched") from None
    finally:
        conn.close()
