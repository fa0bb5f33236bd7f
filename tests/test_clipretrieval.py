"""The clip-retrieval back-end API (issue 15) against the real `ClipClient` from the clip-retrieval wheel and a
real `clipkit serve` subprocess on 127.0.0.1: the same ids as `clipkit search`, several indexes by name, and
every limit of the service on the new routes.

The wheel is installed without its dependencies by scripts/env.sh (`ensure_venv dev`); `clip_client.py` is loaded
from it by path, since the package's `__init__` imports its whole back end.
"""
from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from PIL import Image

from clipkit.cli import main
from test_service import LEAKS, XSS, _readline, assert_error, build_data, png_bytes, stop_server

KEY = "clip-key-0123456789"


def load_clip_client():
    """clip_retrieval/clip_client.py of the installed wheel, as a module (CI must have it: scripts/env.sh)."""
    try:
        path = Path(distribution("clip-retrieval").locate_file("clip_retrieval/clip_client.py"))
    except PackageNotFoundError:
        if os.environ.get("CI"):
            raise
        pytest.skip("clip-retrieval is not installed (scripts/env.sh installs it: pip install --no-deps "
                    "clip-retrieval==2.45.0)")
    spec = importlib.util.spec_from_file_location("clip_client", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def start_cli_server(args: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    """`clipkit serve ARGS --port 0` in a subprocess; returns it and its base URL once /healthz answers."""
    cmd = [sys.executable, "-m", "clipkit.cli", "serve", *args, "--port", "0"]
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
    line = _readline(proc, 90)
    if not line.startswith("listening on http://127.0.0.1:"):
        proc.kill()
        raise AssertionError(f"server did not start: {line!r}\n{log.read_text()[-3000:]}")
    url = line.split()[-1]
    for _ in range(100):
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
    proc.kill()
    raise AssertionError("server never became healthy")


def add_copies(data: SimpleNamespace, copies: dict[int, int]) -> None:
    """Rebuild data's index with exact copies of some images (new row -> copied row), so `deduplicate` acts."""
    import pandas as pd

    from clipkit.search import SearchIndex

    rows = list(data.rows)
    for new, src in copies.items():
        path = data.root / "images" / f"copy{new:02d}.png"
        shutil.copy(rows[src]["image"], path)
        rows.append({**rows[src], "image": str(path), "caption": f"copy of {src}"})
    index = SearchIndex.build(data.embedder.images([r["image"] for r in rows]), pd.DataFrame(rows), kind="flat")
    index.save(data.index_dir)
    data.rows, data.index = rows, SearchIndex.load(data.index_dir)


@pytest.fixture(scope="module")
def site(tmp_path_factory, saved_tiny_dir):
    """`clipkit serve --index main=A --index small=B --model M --api-key-file K`: two indexes, one model."""
    root = tmp_path_factory.mktemp("clipretrieval")
    (root / "a").mkdir()
    (root / "b").mkdir()
    data = build_data(root / "a", saved_tiny_dir)
    add_copies(data, {30: 5, 31: 5, 32: 9})
    small = build_data(root / "b", saved_tiny_dir, n=8)
    (root / "key").write_text(KEY)
    proc, url = start_cli_server(["--index", f"main={data.index_dir}", "--index", f"small={small.index_dir}",
                                  "--model", str(saved_tiny_dir), "--api-key-file", str(root / "key")],
                                 root / "server.log")
    yield SimpleNamespace(url=url, data=data, small=small, model=saved_tiny_dir, log=root / "server.log",
                          authed=url.replace("http://", f"http://clip:{KEY}@"))
    stop_server(proc)


@pytest.fixture(scope="module")
def clip_client():
    return load_clip_client()


@pytest.fixture(scope="module")
def http(site):
    with httpx.Client(base_url=site.url, headers={"X-API-Key": KEY}, timeout=30) as c:
        yield c


def cli_ids(capsys, site, *args: str) -> list[int]:
    """The ids `clipkit search --json` prints for the main index."""
    capsys.readouterr()
    assert main(["search", "--index", str(site.data.index_dir), "--model", str(site.model), "--json", *args]) == 0
    return [r["id"] for r in json.loads(capsys.readouterr().out)["results"]]


# ---------------------------------------------------------------- the real ClipClient

@pytest.mark.parametrize("dedup", [False, True])
def test_clip_client_text_query_matches_clipkit_search(site, clip_client, capsys, dedup):
    client = clip_client.ClipClient(url=site.authed + "/knn-service", indice_name="main", num_images=20,
                                    deduplicate=dedup)
    got = client.query(text="picture number 5")
    assert isinstance(got, list) and len(got) > 5, got
    want = cli_ids(capsys, site, "--text", "picture number 5", "-k", "20", *(["--dedup"] if dedup else []))
    assert [r["id"] for r in got] == want
    sims = [r["similarity"] for r in got]
    assert sims == sorted(sims, reverse=True) and all(-1 <= s <= 1 for s in sims)
    assert all({"caption", "url", "style"} <= r.keys() and "image" not in r.keys() for r in got)  # no paths
    if dedup:  # the copies of 5 (rows 30, 31) are near-duplicates of it: never both in one answer
        assert len({5, 30, 31} & set(want)) <= 1


def test_clip_client_image_query_matches_clipkit_search(site, clip_client, capsys):
    image = site.data.rows[9]["image"]
    client = clip_client.ClipClient(url=site.authed + "/knn-service", indice_name="main", num_images=12,
                                    deduplicate=False)
    got = client.query(image=image)
    want = cli_ids(capsys, site, "--image", image, "-k", "12")
    assert [r["id"] for r in got] == want and got[0]["id"] in (9, 32)  # itself or its exact copy
    assert got[0]["similarity"] == pytest.approx(1.0, abs=1e-4)


def test_clip_client_embedding_query_matches_clipkit_search(site, clip_client, capsys):
    vector = site.data.embedder.texts(["picture number 12"])[0] * 3.0  # not unit length: normalised
    client = clip_client.ClipClient(url=site.authed + "/knn-service", indice_name="main", num_images=15,
                                    deduplicate=False)
    got = client.query(embedding_input=vector.tolist())
    assert [r["id"] for r in got] == cli_ids(capsys, site, "--text", "picture number 12", "-k", "15")


def test_clip_client_needs_the_key(site, clip_client):
    for url in (site.url, site.url.replace("http://", "http://clip:wrong-key@")):
        got = clip_client.ClipClient(url=url + "/knn-service", indice_name="main").query(text="x")
        assert got == {"error": "missing or wrong API key (X-API-Key or Authorization: Bearer)"}
    assert_error(httpx.get(site.url + "/indices-list"), 401)  # every new route is behind the key
    assert_error(httpx.post(site.url + "/metadata", content=b'{"ids": [1]}'), 401)
    assert httpx.get(site.url + "/indices-list", auth=("anyone", KEY)).json() == ["main", "small"]


# ---------------------------------------------------------------- the three routes

def test_indices_list_and_index_by_name(site, http, capsys):
    assert http.get("/indices-list").json() == ["main", "small"]
    body = {"text": "picture number 3", "num_images": 5, "indice_name": "small", "modality": "image"}
    got = http.post("/knn-service", content=json.dumps(body)).json()
    assert [r["id"] for r in got] == [r["id"] for r in site.small.index.results(
        *site.small.index.search(site.data.embedder.texts(["picture number 3"]), 5))[0]]
    assert all(r["url"].endswith("?index=small") for r in got)
    assert_error(http.post("/knn-service", content=json.dumps({**body, "indice_name": "laion5B"})), 404)
    on_small = http.get("/search", params={"q": "picture number 3", "k": 5, "index": "small"}).json()["results"]
    assert [r["id"] for r in on_small] == [r["id"] for r in got]
    assert_error(http.get("/search", params={"q": "x", "index": "nope"}), 404)
    assert http.get("/healthz", params={"index": "small"}).json()["count"] == 8


def test_bodies_are_json_whatever_the_content_type(http):
    body = json.dumps({"text": "picture", "num_images": 3, "indice_name": "main"})
    answers = [http.post("/knn-service", content=body, headers=h).json()
               for h in ({}, {"content-type": "text/plain;charset=UTF-8"}, {"content-type": "application/json"},
                         {"content-type": "application/x-www-form-urlencoded"})]
    assert all(a == answers[0] for a in answers) and len(answers[0]) == 3


def test_first_num_images_carry_metadata_and_the_url_serves_the_image(site, http):
    body = {"text": "picture", "num_images": 4, "num_result_ids": 10, "indice_name": "main"}
    got = http.post("/knn-service", content=json.dumps(body)).json()
    assert len(got) == 10
    assert all("caption" in r and "url" in r for r in got[:4]) and all(r.keys() == {"id", "similarity"}
                                                                        for r in got[4:])
    thumb = http.get(got[0]["url"].replace(site.url, ""))
    assert thumb.status_code == 200 and Image.open(io.BytesIO(thumb.content)).size == (64, 64)
    with_images = http.post("/knn-service", content=json.dumps({**body, "return_image": True})).json()
    img = Image.open(io.BytesIO(base64.b64decode(with_images[0]["image"])))
    assert img.size == (64, 64) and [r["id"] for r in with_images] == [r["id"] for r in got]


def test_metadata_route(site, http):
    ids = [3, 4, 17]
    got = http.post("/metadata", content=json.dumps({"ids": ids, "indice_name": "main"})).json()
    assert [g["id"] for g in got] == ids
    assert got[0]["metadata"]["caption"] == XSS and got[1]["metadata"]["caption"] == "javascript:alert(1)"
    assert got[2]["metadata"]["style"] == "emoji" and "image" not in got[2]["metadata"]
    assert http.post("/metadata", content=json.dumps({"ids": [], "indice_name": "main"})).json() == []
    for bad in ([-1], [10**6], ["3"], [True], "3"):
        assert_error(http.post("/metadata", content=json.dumps({"ids": bad, "indice_name": "main"})), 400, 422)


def test_unsupported_options_are_reported_not_failed(http, site):
    body = {"text": "picture", "num_images": 3, "indice_name": "main", "use_safety_model": True,
            "use_violence_detector": True, "use_mclip": True, "aesthetic_score": 9, "aesthetic_weight": 0.5}
    r = http.post("/knn-service", content=json.dumps(body))
    assert r.status_code == 200 and len(r.json()) == 3
    assert r.headers["x-clipkit-notes"] == "ignored: use_safety_model, use_violence_detector, use_mclip, aesthetic_score"
    plain = http.post("/knn-service", content=json.dumps({**body, "use_safety_model": False, "use_mclip": False,
                                                          "use_violence_detector": False, "aesthetic_score": ""}))
    assert "x-clipkit-notes" not in plain.headers and plain.json() == r.json()


def test_image_url_and_text_modality_are_refused(http):
    for url in ("file:///etc/passwd", "http://127.0.0.1:1/", "http://169.254.169.254/latest/meta-data/"):
        body = assert_error(http.post("/knn-service", content=json.dumps({"image_url": url, "num_images": 3})), 400)
        assert "never fetches" in body["error"]
    body = {"text": "picture", "modality": "text", "num_images": 3}
    assert "image embeddings" in assert_error(http.post("/knn-service", content=json.dumps(body)), 400)["error"]


# ---------------------------------------------------------------- combined queries in both HTTP APIs

def test_combined_and_negative_queries_match_the_cli(site, http, capsys):
    image = site.data.rows[20]["image"]
    want = cli_ids(capsys, site, "--text", "picture number 7", "--image", image, "--image-weight", "0.3", "-k", "8")
    body = {"text": "picture number 7", "image": base64.b64encode(Path(image).read_bytes()).decode(),
            "image_weight": 0.3, "num_images": 8, "indice_name": "main"}
    r = http.post("/knn-service", content=json.dumps(body))
    assert [x["id"] for x in r.json()] == want and "combined" in r.headers["x-clipkit-notes"]
    form = http.post("/search", params={"index": "main"}, data={"q": "picture number 7", "k": "8",
                                                                "image_weight": "0.3"},
                     files={"file": ("q.png", Path(image).read_bytes(), "image/png")}).json()["results"]
    assert [x["id"] for x in form] == want
    assert want != cli_ids(capsys, site, "--image", image, "-k", "8")  # the text part counts

    negative = cli_ids(capsys, site, "--text", "picture -number", "-k", "8")
    assert negative != cli_ids(capsys, site, "--text", "picture", "-k", "8")
    assert [x["id"] for x in http.get("/search", params={"q": "picture -number", "k": 8}).json()["results"]] == negative
    knn = http.post("/knn-service", content=json.dumps({"text": "picture -number", "num_images": 8})).json()
    assert [x["id"] for x in knn] == negative
    assert_error(http.get("/search", params={"q": "-number"}), 400)  # negative terms alone rank nothing


# ---------------------------------------------------------------- limits and hostile bodies on the new routes

def test_body_size_limit(http):
    huge = json.dumps({"text": "x", "image": "A" * (9 << 20)})  # over the 8 MiB default cap
    for route in ("/knn-service", "/metadata"):
        assert_error(http.post(route, content=huge), 413)


@pytest.mark.parametrize("n, status", [(0, 422), (-1, 422), (10**9, 422), ("10", 422), (True, 422), (2.5, 422)])
def test_num_result_ids_limit(http, n, status):
    assert_error(http.post("/knn-service", content=json.dumps({"text": "x", "num_result_ids": n})), status)


def test_num_result_ids_above_max_k_is_cut_and_said(http):
    r = http.post("/knn-service", content=json.dumps({"text": "x", "num_images": 40, "num_result_ids": 3000}))
    assert r.status_code == 200 and len(r.json()) == 33  # every live row of the index, below max_k = 100
    assert r.headers["x-clipkit-notes"] == "num_result_ids cut from 3000 to this server's max_k 100"
    assert_error(http.post("/knn-service", content=json.dumps({"text": "x", "num_images": -3})), 422)
    assert_error(http.post("/metadata", content=json.dumps({"ids": list(range(101))})), 422)  # max_k ids at most


def test_query_length_limit(http):
    assert_error(http.post("/knn-service", content=json.dumps({"text": "a" * 1001})), 400)
    assert http.post("/knn-service", content=json.dumps({"text": "a" * 1000, "num_images": 1})).status_code == 200


def test_pixel_limit(http):
    big = png_bytes(Image.new("RGB", (1200, 1000), (9, 9, 9)))  # 1.2 MP > the 1 MP cap of this 64 px model
    body = assert_error(http.post("/knn-service", content=json.dumps({"image": base64.b64encode(big).decode()})), 413)
    assert "too large" in body["error"]
    for bad in ("not base64!", base64.b64encode(b"GIF89a broken").decode(), 12):
        assert_error(http.post("/knn-service", content=json.dumps({"image": bad})), 400, 415)


@pytest.mark.parametrize("raw", [
    b'{"text": "x", "num_images": NaN}', b'{"embedding_input": [1e999, 0]}', b"[" * 100_000 + b"]" * 100_000,
    b'{"text": "x", "num_images": ' + b"9" * 5000 + b"}", b"\xff\xfe", b"[1, 2]", b"", b'"text"',
    b'{"embedding_input": [0.1, 0.2]}', b'{"embedding_input": "abc"}', b'{"text": ["a"]}', b'{"text": "x", "deduplicate": "yes"}',
    b'{"text": "x", "image_weight": 2}', b'{"text": "x", "indice_name": 5}', b'{}'])
def test_hostile_bodies_get_4xx(http, raw):
    r = http.post("/knn-service", content=raw)
    assert_error(r, 400, 404, 422)
    assert not any(leak in r.text for leak in LEAKS)


def test_zero_and_wrong_dim_embeddings(http, site):
    dim = site.data.embedder.dim
    for vector in ([0.0] * dim, [1.0] * (dim + 1), [float("inf")] * dim):
        assert_error(http.post("/knn-service", content=json.dumps({"embedding_input": vector})), 400)
    assert http.get("/healthz").json()["status"] == "ok"


def test_shared_model_is_loaded_once(site):
    from clipkit.app.service import Limits, load_services

    services = load_services({"a": site.data.index_dir, "b": site.small.index_dir}, site.model, Limits())
    assert services["a"].embedder is services["b"].embedder and services["a"].slots is services["b"].slots
    with pytest.raises(ValueError, match="one model for every index"):
        load_services({"a": site.data.index_dir, "b": site.small.index_dir}, {"a": site.model}, Limits())


def test_serve_index_arguments(tmp_path, capsys):
    from clipkit.cli.search import named_paths

    assert named_paths(["a=/x", "b=/y"], "index") == {"a": "/x", "b": "/y"}
    assert named_paths(["/x/index"], "index") == "/x/index"
    (tmp_path / "odd=name").mkdir()
    assert named_paths([str(tmp_path / "odd=name")], "index") == str(tmp_path / "odd=name")  # a folder, not NAME=
    for bad, message in ((["a=/x", "/y"], "NAME=INDEX_DIR"), (["a=/x", "a=/y"], "given twice")):
        with pytest.raises(ValueError, match=message):
            named_paths(bad, "index")
    assert main(["serve", "--index", "a=/x", "--index", "/y", "--model", "/m"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "NAME=INDEX_DIR" in err[0]
    assert main(["serve", "--index", "/x", "--model", "a=/m"]) == 2
    assert "--model NAME=DIR needs --index NAME=DIR" in capsys.readouterr().err


# ---------------------------------------------------------------- image_url, only when allowed (in-process app)

def _post_all(app, bodies: list[dict]) -> list[httpx.Response]:
    import asyncio

    async def go() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=30) as c:
            return [await c.post("/knn-service", content=json.dumps(b)) for b in bodies]
    return asyncio.run(go())


@pytest.fixture(scope="module")
def image_host(site):
    """A loopback HTTP server: /img.png (an indexed image), /moved (a 302 to it), /big (more than the cap)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    png = Path(site.data.rows[9]["image"]).read_bytes()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            body = {"/img.png": png, "/big": b"\x89PNG" + b"0" * (600 * 1024)}.get(self.path)
            if self.path == "/moved":
                self.send_response(302)
                self.send_header("Location", "/img.png")
                self.end_headers()
                return
            self.send_response(200 if body else 404)
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args):
            pass
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_image_url_when_allowed(site, image_host, monkeypatch, capsys):
    from clipkit.app import fetch
    from clipkit.app.service import create_app

    app = create_app(site.data.index_dir, site.model, allow_image_url=True, max_upload_bytes=512 * 1024)
    refused = _post_all(app, [{"image_url": u, "num_images": 3} for u in (
        image_host + "/img.png", "http://169.254.169.254/latest/meta-data/", "http://localhost:1/", "file:///etc/passwd",
        "ftp://example.com/x.png", "http://[::1]:1/")])
    for r in refused:  # loopback, link-local, other schemes: never fetched
        assert assert_error(r, 400)["error"] in ("image_url: only public addresses are fetched",
                                                 "image_url must be an http(s) URL")
    monkeypatch.setattr(fetch, "is_public", lambda address: True)  # let the test's loopback host count as public
    ok, moved, big = _post_all(app, [{"image_url": image_host + p, "num_images": 12} for p in ("/img.png", "/moved",
                                                                                                 "/big")])
    assert [r["id"] for r in ok.json()] == cli_ids(capsys, site, "--image", site.data.rows[9]["image"], "-k", "12")
    assert "redirects are not followed" in assert_error(moved, 400)["error"]
    assert "more than 524288 bytes" in assert_error(big, 400)["error"]
