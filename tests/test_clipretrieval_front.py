"""The real clip-retrieval web front end (the built bundle in the clip-retrieval wheel, `front/build/`) in headless
Chromium against `clipkit serve`: a text query shows result images. Driven like test_browser.py (Playwright with
Debian's chromium, never a downloaded browser); the front end is served from its own origin, as its users do, and
`clipkit serve --allow-origin` lets it call the API.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import httpx
import pytest

from test_browser import CHROMIUM, CHROMIUM_ARGS, sync_api
from test_clipretrieval import start_cli_server
from test_service import stop_server
from test_service import build_data

SCREENSHOT = Path("/tmp/clipkit_clip_front.png")


def front_build() -> Path:
    try:
        return Path(distribution("clip-retrieval").locate_file("front/build"))
    except PackageNotFoundError:
        if os.environ.get("CI"):
            raise
        pytest.skip("clip-retrieval is not installed (scripts/env.sh installs it --no-deps)")


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def front(tmp_path_factory, saved_tiny_dir):
    """The front end on one loopback port, `clipkit serve --index emoji=DIR` on another, config.json between."""
    root = tmp_path_factory.mktemp("clipfront")
    site = root / "front"
    shutil.copytree(front_build(), site)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(site)))
    front_url = f"http://127.0.0.1:{httpd.server_address[1]}"
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    (root / "data").mkdir()
    data = build_data(root / "data", saved_tiny_dir)
    proc, back_url = start_cli_server(["--index", f"emoji={data.index_dir}", "--model", str(saved_tiny_dir),
                                       "--allow-origin", front_url], root / "server.log")
    (site / "config.json").write_text(json.dumps({"defaultBackend": back_url, "defaultIndex": "emoji"}))
    yield front_url, back_url, data
    stop_server(proc)
    httpd.shutdown()


def test_front_end_text_query_shows_result_images(front):
    front_url, back_url, data = front
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        foreign, errors, calls = [], [], []
        page.on("pageerror", lambda e: errors.append(str(e)))

        def only_ours(route):
            url = route.request.url
            if url.startswith((front_url + "/", back_url + "/")):
                calls.append(url)
                return route.continue_()
            foreign.append(url)
            return route.abort()
        page.route("**/*", only_ours)
        page.goto(f"{front_url}/?query=picture+number+7")  # the front end runs a query given in the URL
        page.wait_for_selector("img.pic", timeout=30_000)  # inside the component's (open) shadow root
        page.wait_for_function("() => { const f = document.querySelector('clip-front');"
                               " const imgs = [...f.shadowRoot.querySelectorAll('img.pic')];"
                               " return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0); }",
                               timeout=30_000)
        shown = page.locator("img.pic")
        sources = [shown.nth(i).get_attribute("src") for i in range(shown.count())]
        assert all(s.startswith(back_url + "/thumb/") and s.endswith("?index=emoji") for s in sources)
        # what the back end answers the front end's own request (deduplicate on: near-duplicates left out)
        body = {"text": "picture number 7", "modality": "image", "num_images": 40, "num_result_ids": 3000,
                "indice_name": "emoji", "deduplicate": True}
        want = [r["id"] for r in httpx.post(back_url + "/knn-service", content=json.dumps(body)).json()]
        assert [int(s.split("/thumb/")[1].split("?")[0]) for s in sources] == want and len(want) >= 5
        titles = [shown.nth(i).get_attribute("title") for i in range(shown.count())]
        assert "<img src=x onerror=alert(1)>" in titles  # the XSS caption is an attribute value, inert
        page.screenshot(path=str(SCREENSHOT), full_page=False)
        browser.close()
    assert any(c.startswith(back_url + "/knn-service") for c in calls)
    assert any(c.startswith(back_url + "/indices-list") for c in calls)
    assert foreign == [] and errors == []
