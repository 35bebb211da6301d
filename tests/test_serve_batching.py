"""The server under load: micro-batching, the bounded queue (503), body timeouts (408), client disconnects,
the Host allow-list, what /api/model and /docs reveal, and several worker processes."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from test_serve import FakePredictor, encode, fake_explain_module, photo, post_from_threads, upload

from mpoxscope.engine.passes import photos_per_forward, views_per_photo
from mpoxscope.serve import ServeConfig, create_app, create_app_from_predictor
from mpoxscope.serve.app import default_allowed_hosts, host_allowed, host_of
from mpoxscope.serve.batching import (
    Admission,
    MicroBatcher,
    PixelBudget,
    QueueFull,
    release_free_memory,
    retry_after_seconds,
)

BOUNDARY = "b0undary"


# ----- MicroBatcher on its own --------------------------------------------------------------------------------

def test_batcher_groups_waiting_items_and_keeps_order():
    sizes: list[int] = []
    gate = threading.Event()

    def double(items):
        gate.wait(5)  # the first batch holds the worker while the rest queue up
        sizes.append(len(items))
        return [2 * x for x in items]

    b = MicroBatcher(double, max_batch=4, max_wait_s=0.0)
    futures = [b.submit(0)]
    time.sleep(0.05)  # the worker has taken item 0 and waits on the gate
    futures += [b.submit(i) for i in range(1, 10)]
    gate.set()
    results = [f.result(5) for f in futures]
    b.close()
    assert [r for r, _ in results] == [2 * i for i in range(10)]
    assert sizes == [1, 4, 4, 1]  # queued items fill batches up to max_batch, without waiting
    assert [info.size for _, info in results[1:5]] == [4, 4, 4, 4]
    assert b.seconds_per_item >= 0


def test_batcher_waits_briefly_for_company():
    sizes: list[int] = []
    # a wide window (1 s for a 0.05 s gap) so a loaded CI machine does not split the pair
    b = MicroBatcher(lambda items: sizes.append(len(items)) or list(items), max_batch=8, max_wait_s=1.0)
    first = b.submit("a")
    time.sleep(0.05)
    second = b.submit("b")  # arrives within the wait window: same batch
    assert first.result(5)[0] == "a" and second.result(5)[0] == "b"
    t0 = time.perf_counter()
    b.submit("c").result(10)  # alone: runs after the wait, not never
    assert time.perf_counter() - t0 < 5.0
    b.close()
    assert sizes == [2, 1]


def test_batcher_error_fails_the_whole_batch_and_skips_cancelled():
    calls: list[list] = []
    gate = threading.Event()

    def fn(items):
        calls.append(list(items))
        gate.wait(5)
        if "bad" in items:
            raise ValueError("boom")
        return items

    b = MicroBatcher(fn, max_batch=8, max_wait_s=0.0)
    first = b.submit("x")
    time.sleep(0.05)
    gone = b.submit("gone")
    assert gone.cancel()  # its client went away while it waited
    bad, other = b.submit("bad"), b.submit("y")
    gate.set()
    assert first.result(5)[0] == "x"
    for f in (bad, other):
        with pytest.raises(ValueError, match="boom"):
            f.result(5)
    b.close()
    assert calls == [["x"], ["bad", "y"]]


def test_batcher_releases_memory_only_when_idle():
    idle: list[int] = []
    gate = threading.Event()

    def fn(items):
        gate.wait(5)
        return items

    b = MicroBatcher(fn, max_batch=2, max_wait_s=0.0, on_idle=lambda: idle.append(1))
    futures = [b.submit(0)]
    time.sleep(0.05)
    futures += [b.submit(i) for i in range(1, 5)]  # queued behind the first batch: batches of 2, 2
    gate.set()
    for f in futures:
        f.result(5)
    time.sleep(0.1)
    b.close()
    assert idle == [1]  # once, after the queue ran dry; never between busy batches
    assert release_free_memory() in (True, False)


def test_batcher_rejects_bad_settings():
    for kw in ({"max_batch": 0}, {"max_wait_s": -1}, {"workers": 0}):
        with pytest.raises(ValueError):
            MicroBatcher(list, **kw)


def test_admission_counts_requests_and_bytes():
    a = Admission(max_requests=2, max_bytes=100, default_bytes=80)
    assert a.charge("10") == 10 and a.charge(None) == 80 and a.charge("junk") == 80 and a.charge("999") == 80
    a.enter(60, lambda n: 3)
    with pytest.raises(QueueFull, match="MB") as e:
        a.enter(60, lambda n: 3)  # 120 bytes > 100
    assert e.value.retry_after == 3
    a.enter(30, lambda n: 1)
    with pytest.raises(QueueFull, match="2 requests"):
        a.enter(1, lambda n: 1)
    a.leave(60)
    a.leave(30)
    a.enter(500, lambda n: 1)  # alone, a request over the byte budget still fits (the upload cap bounds it)
    assert a.refused == 2 and retry_after_seconds(10, 0.5) == 5 and retry_after_seconds(0, 0) == 1


def test_pixel_budget_serialises_huge_decodes():
    budget = PixelBudget(100)
    events: list[str] = []
    first = budget.acquire(60)
    small = budget.acquire(30)  # fits beside the first

    def second() -> None:
        n = budget.acquire(60)  # must wait for the first to finish
        events.append("second")
        budget.release(n)

    t = threading.Thread(target=second)
    t.start()
    time.sleep(0.1)
    events.append("first done")
    budget.release(first)
    t.join(5)
    budget.release(small)
    assert events == ["first done", "second"] and budget.used == 0
    assert budget.acquire(10**9) == 100  # larger than the budget: takes all of it, not forever


# ----- batching through the app ---------------------------------------------------------------------------

class WidthPredictor(FakePredictor):
    """Probabilities that depend on each image's width, so a mixed-up batch would be noticed."""

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__(classes=("Mpox", "Other"), delay=delay)
        self.sizes: list[int] = []

    def predict_images(self, images):
        super().predict_images(images)
        self.sizes.append(len(images))
        p = np.array([(im.width % 100) / 100.0 for im in images])
        return np.stack([p, 1 - p], axis=1)


def test_concurrent_requests_share_forward_passes():
    fake = WidthPredictor(delay=0.3)
    cfg = ServeConfig(max_batch=8, batch_wait_ms=50)
    widths = [110 + i for i in range(8)]
    codes: dict[int, dict] = {}
    with TestClient(create_app_from_predictor(fake, cfg)) as c:
        barrier = threading.Barrier(len(widths))

        def go(w: int) -> None:
            barrier.wait()
            codes[w] = c.post("/api/predict", files=upload(encode(photo((w, 80)), "PNG"))).json()

        threads = [threading.Thread(target=go, args=(w,)) for w in widths]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert sum(fake.sizes) == 8 and len(fake.sizes) < 8 and max(fake.sizes) <= 8
    for w, body in codes.items():  # every photo got its own answer back
        assert body["probabilities"]["Mpox"] == pytest.approx((w % 100) / 100.0)
        assert body["timing_ms"]["batch_size"] >= 1
    assert max(b["timing_ms"]["batch_size"] for b in codes.values()) > 1


def test_max_batch_is_respected():
    fake = WidthPredictor(delay=0.2)
    with TestClient(create_app_from_predictor(fake, ServeConfig(max_batch=3, batch_wait_ms=100))) as c:
        codes = post_from_threads(c, 9, encode(photo(), "PNG"))
    assert codes == [200] * 9 and max(fake.sizes) <= 3 and sum(fake.sizes) == 9


def test_views_per_photo_and_forward_size():
    import types

    import torch

    from mpoxscope.models.tta import TTAModel

    ns = types.SimpleNamespace
    assert views_per_photo(ns(model=TTAModel(torch.nn.Identity(), ("id", "hflip", "vflip")), meta={})) == 3
    assert views_per_photo(ns(model=torch.nn.Linear(2, 2), meta={"tta": {"views": ["id"] * 8}})) == 1
    assert views_per_photo(ns(meta={"tta": {"views": ["id", "hflip"]}})) == 2  # ONNX: from model.json
    assert views_per_photo(ns(meta={"kind": "ensemble"})) == 8 and views_per_photo(ns(meta={})) == 1
    assert photos_per_forward(8) == 2 and photos_per_forward(1) == 16  # 16 images of 224 px per pass
    assert photos_per_forward(8, 448) == 1 and photos_per_forward(1, 112) == 64


def test_micro_batches_run_as_small_forward_passes_with_test_time_views():
    # 8 views at 224 px: a micro-batch of 8 photos is four passes of 2 (16 images each), answers in order.
    fake = WidthPredictor(delay=0.3)
    fake.meta = {**fake.meta, "image_size": 224, "tta": {"views": ["id"] * 8}}
    widths = [110 + i for i in range(8)]
    bodies: dict[int, dict] = {}
    with TestClient(create_app_from_predictor(fake, ServeConfig(max_batch=8, batch_wait_ms=200))) as c:
        barrier = threading.Barrier(len(widths))

        def go(w: int) -> None:
            barrier.wait()
            bodies[w] = c.post("/api/predict", files=upload(encode(photo((w, 80)), "PNG"))).json()

        threads = [threading.Thread(target=go, args=(w,)) for w in widths]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert sum(fake.sizes) == 8 and max(fake.sizes) <= 2
    assert max(b["timing_ms"]["batch_size"] for b in bodies.values()) > 2  # the micro-batch was larger
    for w, body in bodies.items():
        assert body["probabilities"]["Mpox"] == pytest.approx((w % 100) / 100.0)


def test_heat_map_stack_is_imported_only_when_first_needed(monkeypatch):
    import mpoxscope.serve.app as app_module

    calls: list[int] = []
    monkeypatch.setitem(__import__("sys").modules, "mpoxscope.explain", fake_explain_module([]))
    real = app_module.explain_module
    monkeypatch.setattr(app_module, "explain_module", lambda: calls.append(1) or real())
    with TestClient(create_app_from_predictor(FakePredictor(), explain_model_loader=lambda: None)) as c:
        assert c.get("/api/health").status_code == 200
        assert c.post("/api/predict", files=upload(encode(photo(), "PNG"))).status_code == 200
        assert calls == []  # start-up and plain predictions never load grad-cam/matplotlib
        assert c.get("/api/explain-methods").json()["methods"]
        assert c.get("/api/model").status_code == 200
        assert calls == [1]  # once, in a worker thread


# ----- raw ASGI calls: stalled bodies, disconnects, a full queue ---------------------------------------------

def multipart_head(content_length: int | None = None) -> list[tuple[bytes, bytes]]:
    headers = [(b"host", b"127.0.0.1:8000"),
               (b"content-type", f"multipart/form-data; boundary={BOUNDARY}".encode())]
    if content_length is not None:
        headers.append((b"content-length", str(content_length).encode()))
    return headers


def scope(headers) -> dict:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
            "scheme": "http", "path": "/api/predict", "raw_path": b"/api/predict", "query_string": b"",
            "root_path": "", "headers": headers, "client": ("127.0.0.1", 5555), "server": ("127.0.0.1", 8000)}


PART_HEAD = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
             "Content-Type: image/png\r\n\r\n").encode()


async def call(app, headers, receive) -> tuple[int, dict, bytes]:
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    await app(scope(headers), receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body


def stalled_receive(read: list[int], release: asyncio.Event | None = None):
    """Sends the part's head, then nothing more until ``release`` (never, when None)."""
    async def receive() -> dict:
        read.append(1)
        if len(read) == 1:
            return {"type": "http.request", "body": PART_HEAD, "more_body": True}
        await (release.wait() if release else asyncio.Event().wait())
        return {"type": "http.disconnect"}
    return receive


def test_stalled_body_times_out_with_408():
    app = create_app_from_predictor(FakePredictor(), ServeConfig(body_timeout_s=0.3))
    t0 = time.perf_counter()
    status, _, body = asyncio.run(call(app, multipart_head(5000), stalled_receive([])))
    assert status == 408 and "0.3 s" in json.loads(body)["detail"]
    assert time.perf_counter() - t0 < 5


def test_full_queue_answers_503_before_reading_the_body():
    app = create_app_from_predictor(FakePredictor(), ServeConfig(queue_size=2, body_timeout_s=30))

    async def scenario():
        release = asyncio.Event()
        held = [asyncio.create_task(call(app, multipart_head(5000), stalled_receive([], release)))
                for _ in range(2)]
        await asyncio.sleep(0.2)  # both are admitted and waiting for their bodies
        third_reads: list[int] = []
        refused = await call(app, multipart_head(5000), stalled_receive(third_reads))
        release.set()
        await asyncio.gather(*held)
        return refused, third_reads

    (status, headers, body), reads = asyncio.run(scenario())
    assert status == 503 and int(headers["retry-after"]) >= 1
    assert "2 requests" in json.loads(body)["detail"]
    assert reads == []  # not one byte of the refused upload was read


def test_byte_budget_refuses_large_uploads_while_others_are_held():
    app = create_app_from_predictor(FakePredictor(), ServeConfig(queue_size=50, max_buffered_bytes=10_000_000,
                                                                 max_upload_bytes=20_000_000))

    async def scenario():
        release = asyncio.Event()
        held = asyncio.create_task(call(app, multipart_head(8_000_000), stalled_receive([], release)))
        await asyncio.sleep(0.2)
        refused = await call(app, multipart_head(8_000_000), stalled_receive([]))
        release.set()
        await held
        return refused

    status, headers, body = asyncio.run(scenario())
    assert status == 503 and "MB of uploads" in json.loads(body)["detail"] and "retry-after" in headers


def test_queue_frees_its_slots_after_errors():
    app = create_app_from_predictor(FakePredictor(), ServeConfig(queue_size=1))
    with TestClient(app) as c:
        for _ in range(3):  # each bad upload leaves; the next one is admitted
            assert c.post("/api/predict", files=upload(b"junk" * 10)).status_code == 415
        assert c.post("/api/predict", files=upload(encode(photo(), "PNG"))).status_code == 200
    assert app.state.pipeline.admission.requests == 0 and app.state.pipeline.admission.bytes == 0


def test_client_disconnect_is_one_info_line(caplog):
    app = create_app_from_predictor(FakePredictor(), ServeConfig())
    state = {"n": 0}

    async def receive() -> dict:
        state["n"] += 1
        if state["n"] == 1:
            return {"type": "http.request", "body": PART_HEAD + b"\0" * 100, "more_body": True}
        return {"type": "http.disconnect"}

    with caplog.at_level(logging.INFO, logger="mpoxscope.serve"):
        asyncio.run(call(app, multipart_head(5000), receive))
    records = [r for r in caplog.records if r.name.startswith("mpoxscope")]
    assert len(records) == 1 and records[0].levelno == logging.INFO
    assert "disconnected" in records[0].getMessage() and records[0].exc_info is None
    assert app.state.pipeline.admission.requests == 0


# ----- Host header, public model info, docs -------------------------------------------------------------------

def test_host_parsing_and_matching():
    assert host_of("LocalHost:8000") == "localhost" and host_of("[::1]:80") == "::1" and host_of("::1") == "::1"
    allowed = default_allowed_hosts("127.0.0.1", ["scope.example.org", "*.clinic.test"])
    assert allowed[:4] == ("127.0.0.1", "localhost", "::1", "scope.example.org")
    for ok in ("127.0.0.1", "localhost", "::1", "scope.example.org", "a.clinic.test"):
        assert host_allowed(ok, allowed), ok
    for bad in ("evil.example", "", "192.168.1.5", "clinic.test.evil.example", "localhost.evil.example"):
        assert not host_allowed(bad, allowed), bad
    everywhere = default_allowed_hosts("0.0.0.0")
    assert host_allowed("192.168.1.5", everywhere) and host_allowed("fe80::1", everywhere)
    assert not host_allowed("rebind.evil.example", everywhere)
    assert host_allowed("anything", ("*",))


def test_foreign_host_header_is_refused():
    cfg = ServeConfig(allowed_hosts=default_allowed_hosts("127.0.0.1", ["scope.example.org"]))
    with TestClient(create_app_from_predictor(FakePredictor(), cfg)) as c:
        r = c.get("/api/health", headers={"Host": "rebind.evil.example:8000"})
        assert r.status_code == 400 and "--allowed-hosts" in r.json()["detail"]
        bad = c.post("/api/predict", files=upload(encode(photo(), "PNG")), headers={"Host": "evil.example"})
        assert bad.status_code == 400
        for host in ("127.0.0.1:8000", "localhost", "[::1]:8000", "scope.example.org"):
            assert c.get("/api/health", headers={"Host": host}).status_code == 200, host


def test_model_info_has_no_local_paths(tiny_run, tmp_path):
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    meta = json.loads((run / "model.json").read_text())
    secret = str(tmp_path / "clinic" / "patients")
    meta["data"] = {"dataset": "MSLD v2.0", "root": secret, "split_source": f"split file {secret}/folds.csv",
                    "fold": "fold1"}
    meta["validation"] = {"f1_macro": 0.5, "protocol": f"MSLD v2.0, split file {secret}/folds.csv, fold1"}
    (run / "model.json").write_text(json.dumps(meta))
    with TestClient(create_app(run, device="cpu")) as c:
        r = c.get("/api/model")
    assert r.status_code == 200
    assert str(tmp_path) not in r.text and "patients" not in r.text
    body = r.json()
    assert body["data"]["split_source"] == "split file folds.csv" and body["data"]["fold"] == "fold1"
    assert body["metrics"]["protocol"] == "MSLD v2.0, split file folds.csv, fold1"


def test_docs_page_is_local():
    with TestClient(create_app_from_predictor(FakePredictor())) as c:
        r = c.get("/docs")
        assert c.get("/redoc").status_code == 404
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert "<script" not in page and "cdn" not in page.lower()
    assert "https://" not in page and "/api/predict" in page and "503" in page
    assert "default-src 'none'" in r.headers["content-security-policy"]


# ----- the command line: settings and worker processes --------------------------------------------------------

def test_cli_settings_validate(tiny_run, capsys):
    from mpoxscope.cli import main

    for flags, words in ((["--max-batch", "0"], "--max-batch"), (["--queue-size", "0"], "--queue-size"),
                         (["--workers", "0"], "--workers"), (["--onnx", "x.onnx"], "--onnx: x.onnx: file not found"),
                         (["--body-timeout", "0"], "--body-timeout"), (["--max-upload-mb", "nan"], "--max-upload-mb"),
                         (["--max-buffered-mb", "inf"], "--max-buffered-mb: must be a finite number")):
        assert main(["serve", str(tiny_run), "--port", "0", *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1, err


@pytest.mark.slow
def test_cli_two_workers_answer(tiny_run):
    """`mpoxscope serve --workers 2`: two processes, each with its own model, answer on one port."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).with_name("mpoxscope")
    proc = subprocess.Popen([str(exe), "serve", str(tiny_run), "--port", str(port), "--device", "cpu",
                             "--workers", "2", "--log-level", "info"], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        started = 0
        while started < 1:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=5) as r:
                    started = json.loads(r.read())["status"] == "ok"
            except OSError:
                assert proc.poll() is None, proc.stderr.read()
                assert time.time() < deadline, "server did not start"
                time.sleep(0.5)
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/health", headers={"Host": "evil.example"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=5)
        assert e.value.code == 400
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert err.count("Application startup complete") == 2, err  # one per worker process
    assert "2 worker processes" in err

