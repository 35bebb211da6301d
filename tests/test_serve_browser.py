"""The web page in headless Chromium: upload a real MSLD photo, see the bars and the heat-map, keep screenshots.

Needs Debian's ``chromium`` (/usr/bin/chromium) and Playwright for Python; skipped with the reason otherwise.
Screenshots go to ``test-artifacts/serve_page.png`` (phone) and ``serve_page_desktop.png``.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = Path(os.environ.get("MPOXSCOPE_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
PHOTO = Path("images") / "Mpox" / "MKP_01_01.jpg"
LIMIT_PIXELS = 2_000_000
LIMIT_BYTES = 3_000_000


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set MPOXSCOPE_CHROMIUM)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def server(tiny_run) -> Iterator[str]:
    """uvicorn on 127.0.0.1, a free port, in a background thread; yields the base URL. Its limits are low
    (2 MP, 3 MB) so that the page's own resizing of big photos can be tested with small files."""
    import uvicorn

    from mpoxscope.serve import ServeConfig, create_app_from_service, load_service

    config = ServeConfig(max_concurrency=1, max_pixels=LIMIT_PIXELS, max_upload_bytes=LIMIT_BYTES)
    app = create_app_from_service(load_service(tiny_run, device="cpu", config=config))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def analyse_photo(browser, base: str, photo: Path, viewport: dict, mobile: bool, shot: Path) -> dict:
    """Open the page, upload ``photo`` through the file input, wait for the result, screenshot it."""
    from mpoxscope.serve.service import explain_module

    context = browser.new_context(viewport=viewport, is_mobile=mobile, has_touch=mobile,
                                  device_scale_factor=2 if mobile else 1)
    page = context.new_page()
    problems: list[str] = []
    outside: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on("request", lambda r: None if r.url.startswith((base, "data:", "blob:")) else outside.append(r.url))
    try:
        page.goto(base)
        page.wait_for_function("() => document.getElementById('model-facts').children.length > 0")
        want_heatmap = explain_module() is not None
        if want_heatmap:
            page.wait_for_selector("#explain-options:not([hidden])")
        page.set_input_files("#pick", str(photo))
        page.wait_for_selector("#bars li", timeout=60_000)
        page.wait_for_function("() => document.getElementById('status').textContent === 'Done.'", timeout=60_000)
        if want_heatmap:
            page.wait_for_selector("#heatmap-figure:not([hidden])")
            page.wait_for_function("() => document.getElementById('heatmap').naturalWidth > 0")
        page.wait_for_function("() => document.getElementById('photo').naturalWidth > 0")
        if not mobile:
            page.click("#about summary")  # the desktop screenshot also shows the model facts
        shot.parent.mkdir(parents=True, exist_ok=True)
        # Grow the viewport to the whole page rather than full_page=True, which drops touch emulation (and
        # with it the phone-only camera button) while it captures.
        height = page.evaluate("() => document.documentElement.scrollHeight")
        page.set_viewport_size({"width": viewport["width"], "height": height})
        page.screenshot(path=str(shot))
        result = page.evaluate("""() => ({
            bars: [...document.querySelectorAll('#bars li')].map(li => [
                li.querySelector('.name').textContent, li.querySelector('.value').textContent,
                li.querySelector('.fill').getBoundingClientRect().width]),
            abstainShown: !document.getElementById('abstain').hidden,
            abstainText: document.getElementById('abstain').textContent,
            heatmapShown: !document.getElementById('heatmap-figure').hidden,
            disclaimer: document.getElementById('disclaimer').textContent,
            cameraInput: document.getElementById('camera').getAttribute('capture'),
            cameraVisible: document.querySelector('label[for=camera]').offsetParent !== null,
            overflowX: document.documentElement.scrollWidth > window.innerWidth,
        })""")
        result["want_heatmap"] = want_heatmap
    finally:
        context.close()
    assert not problems, problems  # includes Content-Security-Policy violations
    assert not outside, f"the page fetched from elsewhere: {outside}"
    return result


def check(result: dict) -> None:
    bars = result["bars"]
    assert sorted(name for name, _, _ in bars) == sorted(
        ["Mpox", "Chickenpox", "Measles", "Cowpox", "HFMD", "Healthy"])
    assert all(value.endswith("%") for _, value, _ in bars)
    widths = [w for _, _, w in bars]
    assert widths == sorted(widths, reverse=True) and widths[0] > 0  # sorted, highest first, drawn
    assert "not a diagnosis" in result["disclaimer"]
    assert result["cameraInput"] == "environment"
    if result["abstainShown"]:
        assert "refer to a clinician" in result["abstainText"]
    assert result["heatmapShown"] == result["want_heatmap"]
    assert not result["overflowX"], "the page scrolls sideways"


def test_page_phone(browser, server, msld):
    photo = msld / PHOTO
    if not photo.is_file():
        pytest.skip(f"{photo} not found")
    result = analyse_photo(browser, server, photo, {"width": 390, "height": 844}, True,
                           ARTIFACTS / "serve_page.png")
    check(result)
    assert result["cameraVisible"]  # "Take a photo" is offered on a touch device
    # The tiny fixture is untrained: six classes near 1/6 each, so the page must say "uncertain".
    assert result["abstainShown"]


def test_page_desktop(browser, server, msld):
    photo = msld / PHOTO
    if not photo.is_file():
        pytest.skip(f"{photo} not found")
    result = analyse_photo(browser, server, photo, {"width": 1280, "height": 900}, False,
                           ARTIFACTS / "serve_page_desktop.png")
    check(result)
    assert not result["cameraVisible"]


def test_page_shows_server_error(browser, server, tmp_path):
    """A file that is not an image: the page says why, and shows no stale result."""
    bad = tmp_path / "notes.jpg"
    bad.write_bytes(b"this is not an image\n" * 10)
    context = browser.new_context(viewport={"width": 390, "height": 844})
    page = context.new_page()
    try:
        page.goto(server)
        page.set_input_files("#pick", str(bad))
        page.wait_for_selector("#status.error")
        text = page.text_content("#status")
        assert "not a supported image" in text and "notes.jpg" in text
        assert page.is_hidden("#result")
    finally:
        context.close()


@pytest.mark.parametrize("kind", ["pixels", "bytes"])
def test_page_resizes_big_photos(browser, server, tmp_path, kind):
    """Over the pixel limit (server says 413) or the byte limit (checked before sending): the page scales the
    photo down in the browser and still gets an answer."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    if kind == "pixels":  # 4.3 MP, a small JPEG
        img, name = Image.new("RGB", (2400, 1800), (200, 140, 120)), "big.jpg"
    else:  # 1.7 MP of noise: a PNG far over 3 MB
        img, name = Image.fromarray(rng.integers(0, 256, (1100, 1500, 3), dtype=np.uint8)), "big.png"
    path = tmp_path / name
    img.save(path)
    assert (path.stat().st_size > LIMIT_BYTES) == (kind == "bytes")
    context = browser.new_context(viewport={"width": 390, "height": 844})
    page = context.new_page()
    try:
        page.goto(server)
        page.wait_for_function("() => document.getElementById('model-facts').children.length > 0")
        page.set_input_files("#pick", str(path))
        page.wait_for_function("() => document.getElementById('status').textContent === 'Done.'",
                               timeout=60_000)
        note = page.text_content("#timing")
    finally:
        context.close()
    w, h = img.size
    assert f"resized in your browser from {w}\u00d7{h}" in note
