"""HTTP service (RELIABILITY 31-38, 40): the real server in a subprocess on 127.0.0.1, port 0.

One server (API key on, small body cap, short timeouts) serves most tests; the index and the tiny
random model are built once per module. Only loopback traffic.
"""
from __future__ import annotations

import asyncio
import http.client
import io
import json
import re
import select
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pandas as pd
import pytest
from PIL import Image

import clipkit
from clipkit.search import SearchIndex

KEY = "test-key-0123456789"
XSS = "<img src=x onerror=alert(1)>"
BODY_CAP = 512 * 1024
TIMEOUT_S = 2.0
SERVE = ("import json, sys\nfrom clipkit.app.service import run_server\n"
         "run_server(sys.argv[1], sys.argv[2], on_ready=lambda url: print('listening on', url, flush=True),\n"
         "           **json.loads(sys.argv[3]))")
SERVER_OPTIONS = dict(host="127.0.0.1", port=0, api_key=KEY, max_upload_bytes=BODY_CAP, body_timeout=TIMEOUT_S,
                      header_timeout=TIMEOUT_S, timeout_keep_alive=TIMEOUT_S)
LEAKS = ("Traceback", "/tmp/", "/work/", "/home/", "/usr/", "site-packages", " object at 0x", "File \"")


# ---------------------------------------------------------------- building blocks (also used by test_browser)

def build_data(root: Path, model_dir: Path, n: int = 30) -> SimpleNamespace:
    """n PNGs and a saved index of them (metadata: image, caption, style) for the saved model `model_dir`."""
    (root / "images").mkdir()
    rng, rows = np.random.default_rng(0), []
    for i in range(n):
        path = root / "images" / f"img{i:02d}.png"
        base = rng.integers(0, 256, 3)  # a tinted noise image, so images differ clearly
        pixels = np.clip(base + rng.integers(-40, 40, (64, 64, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(path)
        caption = XSS if i == 3 else ("javascript:alert(1)" if i == 4 else f"picture number {i}")
        rows.append({"image": str(path), "caption": caption, "style": "emoji" if i % 2 else "photo"})
    embedder = clipkit.Embedder(model_dir, progress=False)
    index = SearchIndex.build(embedder.images([r["image"] for r in rows]), pd.DataFrame(rows), kind="flat")
    index.save(root / "index")
    return SimpleNamespace(root=root, model_dir=model_dir, index_dir=root / "index", rows=rows,
                           embedder=embedder, index=SearchIndex.load(root / "index"))


def _readline(proc: subprocess.Popen, timeout: float) -> str:
    """One stdout line of `proc`, or "" if it exits or stays silent for `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            return proc.stdout.readline()
        if proc.poll() is not None:
            return ""
    return ""


def start_server(index_dir: Path, model_dir: Path, log: Path, **options) -> tuple[subprocess.Popen, str]:
    """`run_server` in a subprocess; returns it and its base URL once /healthz answers."""
    cmd = [sys.executable, "-c", SERVE, str(index_dir), str(model_dir), json.dumps(options)]
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
    line = _readline(proc, 90)
    match = re.fullmatch(r"listening on (http://127\.0\.0\.1:(\d+))\n", line)
    if not match:
        proc.kill()
        raise AssertionError(f"server did not start: {line!r}\n{log.read_text()[-3000:]}")
    url = match.group(1)
    for _ in range(100):
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("server never became healthy")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def assert_error(r: httpx.Response, *statuses: int) -> dict:
    """A clean JSON error: expected status, `{"error": str}`, nothing that leaks internals."""
    assert r.status_code in statuses, (r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert isinstance(body.get("error"), str) and body["error"]
    assert not any(leak in r.text for leak in LEAKS), r.text
    return body


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def data(tmp_path_factory, saved_tiny_dir) -> SimpleNamespace:
    return build_data(tmp_path_factory.mktemp("service"), saved_tiny_dir)


@pytest.fixture(scope="module")
def server(data, tmp_path_factory) -> SimpleNamespace:
    """The shared server; beside it (to overlap start-up) one that must refuse a truncated index."""
    bad = _corrupt_copies(data, tmp_path_factory.mktemp("bad"))["truncated"]
    corrupt = subprocess.Popen([sys.executable, "-c", SERVE, str(bad), str(data.model_dir), '{"port": 0}'],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc, url = start_server(data.index_dir, data.model_dir, data.root / "server.log", **SERVER_OPTIONS)
    yield SimpleNamespace(proc=proc, url=url, port=int(url.rsplit(":", 1)[1]), corrupt=corrupt)
    stop_server(proc)
    if corrupt.poll() is None:
        corrupt.kill()
        corrupt.communicate()


@pytest.fixture(scope="module")
def client(server) -> httpx.Client:
    with httpx.Client(base_url=server.url, headers={"X-API-Key": KEY}, timeout=15) as c:
        yield c


def expected(data: SimpleNamespace, vector: np.ndarray, k: int, **filters) -> list[dict]:
    """What SearchIndex returns for the same query vector, called directly."""
    return data.index.results(*data.index.search(vector, k, filter=filters or None))[0]


def assert_same_results(got: list[dict], want: list[dict]) -> None:
    assert [r["id"] for r in got] == [r["id"] for r in want]
    assert [r["score"] for r in got] == pytest.approx([r["score"] for r in want], abs=1e-5)
    assert all(r.keys() == {"id", "score", "caption", "style"} for r in got)  # no file paths
    assert [r["score"] for r in got] == sorted((r["score"] for r in got), reverse=True)


# ---------------------------------------------------------------- good paths

def test_listens_on_loopback_only(server):
    """The socket is bound to 127.0.0.1 (checked in /proc, not only in the printed line)."""
    listening = []
    for line in Path(f"/proc/{server.proc.pid}/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        if state == "0A":  # LISTEN
            listening.append((socket.inet_ntoa(struct.pack("<I", int(local[:8], 16))), int(local[9:], 16)))
    assert ("127.0.0.1", server.port) in listening
    assert all(addr == "127.0.0.1" for addr, port in listening if port == server.port)


def test_healthz_is_open(server, data):
    r = httpx.get(server.url + "/healthz")  # no API key needed for liveness
    assert r.status_code == 200
    want = {"status": "ok", "count": 30, "dim": data.embedder.dim, "model": data.model_dir.name, "max_k": 100,
            "max_pixels": 1_000_000, "index": "index", "indexes": ["index"]}  # 64 x 64^2 px, at least 1 MP
    assert r.json() == want


def test_text_search_matches_index(client, data):
    r = client.get("/search", params={"q": "a reddish picture", "k": 7})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert_same_results(r.json()["results"], expected(data, data.embedder.texts(["a reddish picture"]), 7))


def test_text_search_filters(client, data):
    vec = data.embedder.texts(["cat"])
    r = client.get("/search", params={"q": "cat", "k": 30, "style": "emoji"})
    got = r.json()["results"]
    assert len(got) == 15 and {x["style"] for x in got} == {"emoji"}  # k > matches: no -1 padding
    assert_same_results(got, expected(data, vec, 30, style="emoji"))
    assert client.get("/search", params={"q": "cat", "style": "nope"}).json() == {"results": []}
    both = client.get("/search", params=[("q", "cat"), ("k", "30"), ("style", "emoji"), ("style", "photo")])
    assert len(both.json()["results"]) == 30


def test_image_search_matches_index(client, data):
    png = Path(data.rows[5]["image"]).read_bytes()
    r = client.post("/search", files={"file": ("q.png", png, "image/png")}, data={"k": "5"})
    assert r.status_code == 200
    got = r.json()["results"]
    assert got[0]["id"] == 5 and got[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert_same_results(got, expected(data, data.embedder.images([data.rows[5]["image"]]), 5))


def test_image_search_16bit_png(client):
    """An `I;16` PNG is decoded by scaling, not clipped to white: it searches like its 8-bit twin."""
    g16 = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))
    img16 = Image.fromarray(g16)
    assert img16.mode == "I;16"
    hits = [client.post("/search", files={"file": ("g.png", png_bytes(img), "image/png")}).json()["results"]
            for img in (img16, Image.fromarray((g16 >> 8).astype(np.uint8)))]
    assert [h["id"] for h in hits[0][:3]] == [h["id"] for h in hits[1][:3]]  # below: ties within 2e-4 may swap
    assert [h["score"] for h in hits[0]] == pytest.approx([h["score"] for h in hits[1]], abs=0.01)


def test_thumb(client, data):
    r = client.get("/thumb/7")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["x-content-type-options"] == "nosniff"
    img = Image.open(io.BytesIO(r.content))
    assert img.format == "PNG" and max(img.size) <= 256


def test_page_is_inert(client, server):
    """The page has a CSP allowing only self and renders data with textContent, never as HTML or links."""
    r = httpx.get(server.url + "/")  # the page itself is public; its API calls carry the key
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert r.headers["x-content-type-options"] == "nosniff"
    assert "<script>" not in r.text and 'src="/static/app.js"' in r.text  # no inline script: CSP holds
    js = httpx.get(server.url + "/static/app.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert "textContent" in js.text
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "javascript:", "eval("):
        assert sink not in js.text
    results = client.get("/search", params={"q": "x", "k": 30}).json()["results"]
    assert XSS in {x["caption"] for x in results}  # returned as data, in a JSON body


# ---------------------------------------------------------------- 31. oversized bodies

def test_oversized_body_413(client, server):
    before = rss_mib(server.proc.pid)
    big = b'{"q": "' + b"a" * (1 << 20) + b'"}'
    assert_error(client.post("/search", content=big, headers={"content-type": "application/json"}), 413)

    def chunks():  # no Content-Length: counted while streaming
        for _ in range(11):
            yield b"x" * 64 * 1024
    r = client.post("/search", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert "content-length" not in r.request.headers
    assert_error(r, 413)
    assert rss_mib(server.proc.pid) - before < 20
    assert client.get("/healthz").status_code == 200


def test_huge_chunked_upload_is_cut_off(client, server):
    """Past twice the cap the server stops reading and closes; a reset is an acceptable answer."""
    def chunks():
        for _ in range(200):
            yield b"x" * 256 * 1024
    try:
        r = client.post("/search", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
        assert_error(r, 413)
    except httpx.TransportError:
        pass
    assert client.get("/healthz").status_code == 200


# ---------------------------------------------------------------- 32. image uploads

def _png(width: int, height: int, rows: int) -> bytes:
    """An 8-bit grey PNG whose header says width x height; `rows` rows of zeros are really encoded."""
    def chunk(tag: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))
    z, row = zlib.compressobj(9), b"\0" * (width + 1)
    idat = b"".join(z.compress(row * min(1000, rows - i)) for i in range(0, rows, 1000)) + z.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _encoded(fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buf, fmt, **kw)
    return buf.getvalue()


UPLOADS = {
    "bomb_14000px": (lambda: _png(14000, 14000, 14000), 413),  # 190 KB file, 196 M pixels
    "over_max_pixels": (lambda: _png(8000, 6000, 1), 413),  # under Pillow's limit, over ours (1 M here)
    "truncated_jpeg": (lambda: _encoded("JPEG")[:300], 400),
    "truncated_png": (lambda: png_bytes(Image.new("RGB", (64, 64), (1, 2, 3)))[:60], 400),
    "tiff": (lambda: _encoded("TIFF"), 415),
    "eps": (lambda: b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n", 415),
    "svg": (lambda: b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)"/>', 415),
    "not_an_image": (lambda: b"hello, I am text", 415),
    "empty": (lambda: b"", 400),
}


@pytest.mark.parametrize("case", UPLOADS)
def test_image_upload_attacks(client, server, case):
    make, status = UPLOADS[case]
    payload = make()
    before, t0 = rss_mib(server.proc.pid), time.perf_counter()
    r = client.post("/search", files={"file": ("x.png", payload, "image/png")})
    assert_error(r, status)
    assert time.perf_counter() - t0 < 1.5
    assert rss_mib(server.proc.pid) - before < 30


# ---------------------------------------------------------------- 33. traversal on /thumb

TRAVERSALS = ["/thumb/..%2f..%2f..%2fetc%2fpasswd", "/thumb/%2e%2e/%2e%2e/etc/passwd", "/thumb/../../etc/passwd",
              "/thumb/%2fetc%2fpasswd", "/thumb//etc/passwd", "/thumb/1%00", "/thumb/1%00.png", "/thumb/abc",
              "/thumb/-1", "/thumb/30", "/thumb/99999999999", "/thumb/1.0", "/thumb/0x1", "/thumb/%20",
              "/thumb/..%5c..%5cetc%5cpasswd", "/thumb/" + "9" * 5000, "/thumb/1;/etc/passwd"]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_thumb_traversal(server, path):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", path, headers={"X-API-Key": KEY})  # sent verbatim, no client-side normalisation
    resp = conn.getresponse()
    body = resp.read().decode("utf-8", "replace")
    conn.close()
    assert resp.status in (400, 404, 422), (path, resp.status)
    assert "root:" not in body and resp.getheader("content-type", "").startswith("application/json")
    assert not any(leak in body for leak in LEAKS)


# ---------------------------------------------------------------- 34. SSRF-ish fields

def test_url_and_path_fields_are_ignored(client, data):
    trap = socket.create_server(("127.0.0.1", 0))
    trap.settimeout(0.5)
    lure = f"http://127.0.0.1:{trap.getsockname()[1]}/"
    png = Path(data.rows[2]["image"]).read_bytes()
    plain = client.post("/search", files={"file": ("a.png", png, "image/png")}).json()
    fields = {"image_url": lure, "url": "file:///etc/passwd", "path": "/etc/passwd", "image": "/etc/passwd",
              "k": "10"}
    lured = client.post("/search", files={"file": ("a.png", png, "image/png")}, data=fields)
    assert lured.status_code == 200 and lured.json() == plain
    assert_error(client.post("/search", files={"other": ("a.txt", b"x")}, data=fields), 400)
    assert_error(client.get("/search", params={"q": "x", "image_url": lure}), 400)
    with pytest.raises(socket.timeout):
        trap.accept()  # nobody called back
    trap.close()


# ---------------------------------------------------------------- 35. parameter abuse

ABUSE = [({"q": "x", "k": "0"}, 422), ({"q": "x", "k": "-1"}, 422), ({"q": "x", "k": str(10**9)}, 422),
         ({"q": "x", "k": "ten"}, 422), ({"q": "x", "k": "1.5"}, 422), ({"q": "x", "k": ""}, 422),
         ({"q": "x", "k": "9" * 5000}, 422), ({"q": "x", "k": "101"}, 422), ({"q": ""}, 400), ({"q": "   "}, 400),
         ({}, 400), ({"q": "x" * 1001}, 400), ({"q": "x", "nprobe": "1"}, 400), ({"q": "x", "filter": "1==1"}, 400),
         ({"q": "x", "caption": "a" * 1001}, 400), ([("q", "a"), ("q", "b")], 400), ([("q", "a"), ("k", "1"),
                                                                                     ("k", "2")], 400)]


@pytest.mark.parametrize("params,status", ABUSE, ids=lambda v: str(v)[:40] if isinstance(v, dict) else None)
def test_parameter_abuse(client, params, status):
    assert_error(client.get("/search", params=params), status)
    assert client.get("/healthz").status_code == 200


def test_megabyte_query_string_is_refused(client, server):
    """A 1 MB URL is refused by the HTTP layer (h11's 16 KiB header limit) before any app code runs."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("GET", "/search?q=" + "x" * (1 << 20), headers={"X-API-Key": KEY})
        resp = conn.getresponse()
        assert resp.status == 400 and b"Traceback" not in resp.read()
    except (ConnectionResetError, BrokenPipeError):
        pass  # closed while we were still sending: also a refusal
    finally:
        conn.close()
    assert client.get("/healthz").status_code == 200


JSON_BODIES = {"nan": b'{"q": NaN, "k": 5}', "inf": b'{"q": "x", "k": 1e999}', "deep": b"[" * 100_000 + b"]" * 100_000,
               "big_int": b'{"k": ' + b"9" * 5000 + b"}", "wrong_dim": json.dumps({"embedding": [0.1] * 7}).encode()}


@pytest.mark.parametrize("case", JSON_BODIES)
def test_json_bodies_are_not_parsed(client, case):
    r = client.post("/search", content=JSON_BODIES[case], headers={"content-type": "application/json"})
    assert_error(r, 413, 415)
    assert client.get("/healthz").status_code == 200


def test_unknown_routes_and_methods(client):
    assert_error(client.get("/nope"), 404)
    assert_error(client.delete("/search"), 405)
    assert_error(client.get("/docs"), 404)  # no interactive docs, no OpenAPI schema
    assert_error(client.get("/openapi.json"), 404)


# ---------------------------------------------------------------- 36. auth, CORS, Host

@pytest.mark.parametrize("headers", [{}, {"X-API-Key": "test-key-0123456780"}, {"X-API-Key": "short"},
                                     {"X-API-Key": KEY + "x"}, {"Authorization": f"Basic {KEY}"},
                                     {"Authorization": "Bearer"}, {"X-API-Key": ""}],
                         ids=["none", "wrong", "shorter", "longer", "basic", "empty_bearer", "empty"])
def test_api_key_required(server, headers):
    for path in ("/search?q=x", "/thumb/1"):
        assert_error(httpx.get(server.url + path, headers=headers), 401)
    r = httpx.post(server.url + "/search", headers=headers, files={"file": ("a", b"x" * 1000)})
    assert_error(r, 401)


@pytest.mark.parametrize("headers", [{"X-API-Key": KEY}, {"Authorization": f"Bearer {KEY}"}])
def test_api_key_accepted(server, headers):
    assert httpx.get(server.url + "/search?q=x", headers=headers).status_code == 200


def test_no_cors_by_default(client):
    r = client.get("/search", params={"q": "x"}, headers={"Origin": "http://evil.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    pre = client.options("/search", headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "GET"})
    assert "access-control-allow-origin" not in pre.headers and pre.status_code >= 400


@pytest.mark.parametrize("host", ["evil.example", "evil.example:80", "127.0.0.1.evil.example", "localhost.evil",
                                  "[::2]:80", ""])
def test_foreign_host_rejected(client, host):
    assert_error(client.get("/healthz", headers={"Host": host}), 400)


def test_loopback_hosts_accepted(client, server):
    for host in (f"127.0.0.1:{server.port}", f"localhost:{server.port}", "LOCALHOST", f"[::1]:{server.port}"):
        assert client.get("/healthz", headers={"Host": host}).status_code == 200


# ---------------------------------------------------------------- in-process app: concurrency, CORS opt-in, crashes

@pytest.fixture(scope="module")
def app(data):
    from clipkit.app.service import create_app

    return create_app(data.index_dir, data.model_dir, max_concurrency=2, allow_origins=("http://ok.example",))


def test_app_runs_its_models_at_the_precision_asked(data):
    from clipkit.app.service import create_app

    assert app_precision(create_app(data.index_dir, data.model_dir)) == clipkit.Embedder(data.model_dir).precision
    assert app_precision(create_app(data.index_dir, data.model_dir, precision="int8")).image == "int8"


def app_precision(app):
    return app.state.service.embedder.precision


def _gather(app, requests: list[tuple[str, str, dict]]) -> list[httpx.Response]:
    """Send (method, url, headers) requests to the ASGI app all at once."""
    async def go() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
            return await asyncio.gather(*(c.request(m, u, headers=h) for m, u, h in requests))
    return asyncio.run(go())


def test_concurrency_limit_answers_503(app, monkeypatch):
    """With 2 slots, 6 simultaneous slow searches give 2 answers and 4 quick 503s."""
    embedder = app.state.service.embedder
    texts = embedder.texts
    monkeypatch.setattr(embedder, "texts", lambda q: (time.sleep(0.5), texts(q))[1])
    t0 = time.perf_counter()
    responses = _gather(app, [("GET", "/search?q=x", {})] * 6)
    assert sorted(r.status_code for r in responses) == [200, 200, 503, 503, 503, 503]
    assert time.perf_counter() - t0 < 1.5  # nobody queued behind the slow ones
    for r in responses:
        if r.status_code == 503:
            assert r.headers["retry-after"] == "1" and assert_error(r, 503)


def test_cors_only_for_configured_origins(app):
    ok, evil = _gather(app, [("GET", "/healthz", {"Origin": "http://ok.example"}),
                             ("GET", "/healthz", {"Origin": "http://evil.example"})])
    assert ok.headers["access-control-allow-origin"] == "http://ok.example"
    assert "access-control-allow-origin" not in evil.headers


def test_bodies_held_at_once_are_bounded():
    """The guard holds at most 8 caps of request bodies at once; the next body gets 503, and it all drains."""
    from clipkit.app.guard import Guard

    release = asyncio.Event()

    async def slow_app(scope, receive, send):
        await receive()
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
    guard = Guard(slow_app, hosts=None, key=None, max_body=100, body_timeout=5)

    async def go() -> list[int]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=guard), base_url="http://t") as c:
            tasks = [asyncio.create_task(c.post("/", content=b"x" * 100)) for _ in range(9)]
            await asyncio.sleep(0.2)
            release.set()
            return [r.status_code for r in await asyncio.gather(*tasks)]
    assert sorted(asyncio.run(go())) == [200] * 8 + [503]
    assert guard.buffered == 0


def test_internal_errors_are_opaque(app, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("secret detail at /srv/data/index.faiss")
    monkeypatch.setattr(app.state.service.index, "search", boom)
    (r,) = _gather(app, [("GET", "/search?q=x", {})])
    assert assert_error(r, 500) == {"error": "internal server error"} and "secret" not in r.text


def test_thumbnails_come_from_the_image_column_only(data, tmp_path, caplog):
    """Thumbnails are read from `image`; an index naming the column otherwise (older clipkit: `path`)
    serves none and says so at start-up; its search results hide that path column too."""
    from clipkit.app.service import create_app

    legacy = data.index.metadata.rename(columns={"image": "path"})
    SearchIndex(data.index.index, legacy, data.index.factory, vectors=np.asarray(data.index.vectors)
                ).save(tmp_path / "legacy")
    assert _gather(create_app(data.index_dir, data.model_dir), [("GET", "/thumb/7", {})])[0].status_code == 200
    with caplog.at_level("WARNING", logger="clipkit.app.service"):
        app = create_app(tmp_path / "legacy", data.model_dir)
    assert "no 'image' metadata column" in caplog.text
    thumb, hits = _gather(app, [("GET", "/thumb/7", {}), ("GET", "/search?q=picture&k=3", {})])
    assert_error(thumb, 404)
    assert [set(h) for h in hits.json()["results"]] == [{"id", "score", "caption", "style"}] * 3


# ---------------------------------------------------------------- 28 via the service: never serve half-loaded

def _corrupt_copies(data: SimpleNamespace, root: Path) -> dict[str, Path]:
    import shutil

    out = {}
    truncated = shutil.copytree(data.index_dir, root / "truncated")
    raw = (truncated / "index.faiss").read_bytes()
    (truncated / "index.faiss").write_bytes(raw[: len(raw) // 3])
    out["truncated"] = truncated
    rng = np.random.default_rng(1)
    SearchIndex.build(rng.normal(size=(5, 8)).astype(np.float32)).save(root / "dim8")
    out["dim_mismatch"] = root / "dim8"
    out["missing"] = root / "no-such-index"
    return out


def test_corrupt_index_exits_before_binding(server):
    """`serve` on a truncated index exits non-zero with the reason and never prints a listening line."""
    out, err = server.corrupt.communicate(timeout=120)
    assert server.corrupt.returncode != 0 and "listening on" not in out
    assert "truncated or corrupt" in err


@pytest.mark.parametrize("case,message", [("dim_mismatch", "dim mismatch"), ("missing", "missing index.json")])
def test_mismatched_index_refused_at_creation(data, tmp_path, case, message):
    from clipkit.errors import IndexLoadError
    from clipkit.app.service import create_app

    with pytest.raises(IndexLoadError, match=message):
        create_app(_corrupt_copies(data, tmp_path)[case], data.model_dir)


# ---------------------------------------------------------------- 37. slow clients

def _stalled(port: int, request: bytes) -> tuple[socket.socket, float]:
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(request)
    return s, time.monotonic()


def _closed_after(sock: socket.socket, opened: float, limit: float) -> float:
    """Seconds from `opened` until the server closed `sock` (it may answer 408 first); inf if it never did."""
    sock.settimeout(limit)
    try:
        while sock.recv(4096):
            pass
    except socket.timeout:
        return float("inf")
    except ConnectionResetError:
        pass
    finally:
        sock.close()
    return time.monotonic() - opened


def test_stalled_body_gets_408_and_close(server):
    sock, opened = _stalled(server.port, (f"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {KEY}\r\n"
                                          "Content-Length: 100\r\n\r\nx").encode())
    sock.settimeout(TIMEOUT_S + 6)
    answer = sock.recv(4096)
    while b"\r\n\r\n" in answer and b'"error"' not in answer:  # headers and body may come in two segments
        more = sock.recv(4096)
        if not more:
            break
        answer += more
    assert answer.startswith(b"HTTP/1.1 408") and b'"error"' in answer
    # slack for a loaded 2-core machine; a server that never closes gives inf
    assert _closed_after(sock, opened, 6) < TIMEOUT_S + 4


@pytest.mark.slow
def test_slow_clients_are_cut_off(client, server):
    body_stall = (f"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {KEY}\r\nContent-Type: "
                  "multipart/form-data; boundary=b\r\nContent-Length: 100\r\n\r\nx").encode()
    header_stall = b"GET /search?q=x HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
    socks = [_stalled(server.port, body_stall) for _ in range(20)] + [_stalled(server.port, header_stall)]
    latencies = []
    for _ in range(10):  # normal traffic meanwhile
        t0 = time.perf_counter()
        assert client.get("/search", params={"q": "still fine"}).status_code == 200
        latencies.append(time.perf_counter() - t0)
    closed = [None] * len(socks)
    threads = [threading.Thread(target=lambda i=i: closed.__setitem__(i, _closed_after(*socks[i], 10)))
               for i in range(len(socks))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert max(closed) < TIMEOUT_S + 2, closed
    assert max(latencies) < 2.0
    assert client.get("/healthz").status_code == 200
