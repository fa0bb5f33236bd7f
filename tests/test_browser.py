"""The search page in a real headless Chromium (Debian's, driven by Playwright): search, thumbnails, XSS.

Needs the `playwright` pip package (its driver only: never `playwright install`) and `/usr/bin/chromium`.
"""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from test_service import XSS, build_data, start_server, stop_server

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT = Path("/tmp/clipkit_page.png")

if os.environ.get("CI"):  # CI installs both (.ci/run): a missing one must fail there, not skip silently
    import playwright.sync_api as sync_api  # noqa: F401

    assert os.access(CHROMIUM, os.X_OK), f"{CHROMIUM} is missing: .ci/run should have installed Debian `chromium`"
else:
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip package `playwright` is not installed")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} is missing (Debian package `chromium`)", allow_module_level=True)


@pytest.fixture(scope="module")
def site(tmp_path_factory, saved_tiny_dir) -> SimpleNamespace:
    data = build_data(tmp_path_factory.mktemp("browser"), saved_tiny_dir)
    proc, url = start_server(data.index_dir, data.model_dir, data.root / "server.log", port=0)
    yield SimpleNamespace(url=url, data=data)
    stop_server(proc)


@pytest.fixture
def page(site):
    """A fresh page; requests leaving the test server are aborted and recorded; dialogs are recorded."""
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        pg = browser.new_page(viewport={"width": 1100, "height": 900})
        pg.dialogs, pg.foreign, pg.js_errors = [], [], []
        pg.on("dialog", lambda d: (pg.dialogs.append(d.message), d.dismiss()))
        pg.on("pageerror", lambda e: pg.js_errors.append(str(e)))

        def only_local(route):
            if route.request.url.startswith(site.url + "/"):
                return route.continue_()
            pg.foreign.append(route.request.url)
            return route.abort()
        pg.route("**/*", only_local)
        yield pg
        browser.close()


def _all_thumbs_loaded(pg) -> None:
    pg.wait_for_selector("#results figure img")
    pg.wait_for_function("() => [...document.querySelectorAll('#results img')]"
                         ".every(i => i.complete && i.naturalWidth > 0)", timeout=15_000)


def test_text_search_shows_thumbnails_and_inert_captions(page, site):
    page.goto(site.url + "/")
    page.wait_for_function("() => document.getElementById('status').textContent.includes('30 images')")
    page.fill("#q", "a picture")
    page.fill("#k", "30")
    page.click("#go")
    _all_thumbs_loaded(page)
    assert page.locator("#results figure").count() == 30
    captions = page.locator("#results .caption").all_text_contents()
    assert XSS in captions and "javascript:alert(1)" in captions  # shown as text
    assert page.locator("#results img[src='x']").count() == 0  # the caption's <img> never became an element
    assert page.locator("#results a").count() == 0  # no links at all, so no javascript: links
    scores = [float(s) for s in page.locator("#results .score").all_text_contents()]
    assert scores == sorted(scores, reverse=True)
    page.wait_for_timeout(300)  # give a would-be onerror handler its chance
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    assert page.dialogs == [] and page.js_errors == [] and page.foreign == []


def test_image_upload_search(page, site):
    page.goto(site.url + "/")
    page.set_input_files("#file", site.data.rows[5]["image"])
    _all_thumbs_loaded(page)
    first = page.locator("#results figure").first
    assert first.locator(".caption").text_content() == site.data.rows[5]["caption"]
    assert float(first.locator(".score").text_content()) == pytest.approx(1.0, abs=1e-3)
    assert page.dialogs == [] and page.js_errors == [] and page.foreign == []


def test_thumbnails_with_api_key_use_blob_urls(page, site):
    """With a key typed in, thumbnails are fetched with the key header and shown from blob: URLs."""
    page.goto(site.url + "/")
    page.click("summary")
    page.fill("#key", "any-key")  # this server has no key, so any key passes
    page.fill("#q", "a picture")
    page.click("#go")
    _all_thumbs_loaded(page)
    sources = page.eval_on_selector_all("#results img", "imgs => imgs.map(i => i.src)")
    assert len(sources) == 24 and all(s.startswith("blob:") for s in sources)
    assert page.js_errors == [] and page.foreign == []


def test_errors_are_shown_as_text(page, site):
    page.goto(site.url + "/")
    page.set_input_files("#file", files=[{"name": "evil.svg", "mimeType": "image/svg+xml",
                                          "buffer": b'<svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)"/>'}])
    page.wait_for_function("() => document.getElementById('message').className === 'error'")
    assert "unsupported image format SVG" in page.locator("#message").text_content()
    assert page.dialogs == []


def test_upload_over_the_pixel_cap_is_shrunk_by_the_page(page, site, tmp_path):
    """A 2000 x 1500 PNG is over this server's 1 M pixel cap (a direct POST gets 413); the page redraws it
    under the cap before uploading, so the search still runs."""
    import httpx
    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 255, 2000, dtype=np.uint8)
    big = tmp_path / "big.png"
    Image.fromarray(np.stack([np.tile(ramp, (1500, 1))] * 3, axis=-1)).save(big)
    direct = httpx.post(site.url + "/search", files={"file": ("big.png", big.read_bytes(), "image/png")})
    assert direct.status_code == 413
    page.goto(site.url + "/")
    page.wait_for_function("() => document.getElementById('status').textContent.includes('30 images')")
    page.set_input_files("#file", str(big))
    _all_thumbs_loaded(page)
    assert page.locator("#message").get_attribute("class") != "error"
    assert page.locator("#results figure").count() == 24 and page.js_errors == []
