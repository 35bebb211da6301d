"""Load test of `mpoxscope serve` on 127.0.0.1: throughput and latency under concurrent clients, a burst of large
uploads beyond the queue, and near-limit PNGs, with the server's peak resident memory.

    .venv/bin/python benchmarks/serve_load.py RUN [--config torch] [--config onnx-lite:RUN/model.int8.onnx]
        [--clients 32] [--duration 60] [--out benchmarks/results/serve_load.md]

Each ``--config`` is ``RUNTIME[:ONNX_FILE]``; per config the script

1. measures the *offline* throughput of the same runtime in this process (JPEG bytes -> decode ->
   ``predict_images`` on 16 photos, the work the server does per photo; also at the server's forward-pass
   size), before the server starts and again after step 3: the ratio uses the mean of the two;
2. starts ``mpoxscope serve RUN --host 127.0.0.1`` (loopback only) and waits for /api/health;
3. runs ``--clients`` keep-alive clients (asyncio, one process, photo bytes read beforehand), each posting real
   MSLD v2.0 photos back to back for ``--duration`` seconds (at most ``--max-requests`` in all): throughput,
   p50/p99 latency, errors, micro-batch sizes, and the CPU seconds of the load generator, the server and the
   rest of the machine;
4. sends a burst of ``--burst`` concurrent ~15 MB JPEG uploads (``Expect: 100-continue``, as curl sends for
   large bodies, so a refused upload is not transmitted): counts of 200/503/other;
5. sends 4 concurrent near-limit RGBA PNGs (~64 MP, a few hundred kB each);

sampling the server's resident memory (all its processes, from /proc) every 20 ms throughout, and reading its
true peak (VmHWM, reset between phases) so that short spikes are not missed. The load generator runs on the
same machine, so it takes CPU from the server: a lower bound on what the server can do.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

HOST = "127.0.0.1"  # never anything else: this script only talks to a server it started on loopback
BOUNDARY = "mpoxscopeloadtest"
START_TIMEOUT = float(os.environ.get("SERVE_LOAD_START_TIMEOUT", "300"))  # a starved machine needs more


# ----- memory of the server's process tree ---------------------------------------------------------------------

def _children(pid: int) -> list[int]:
    out = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            text = (task / "children").read_text().split()
            out += [int(c) for c in text]
    except OSError:
        pass
    return out


def tree_rss_bytes(pid: int) -> int:
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
        todo += _children(p)
    return total


def _tree_pids(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo += _children(p)
    return pids


def tree_hwm_bytes(pid: int) -> int:
    """Sum over the tree of each process's peak RSS (VmHWM) since its last reset: catches spikes shorter
    than the sampling interval (a forward pass allocates and frees hundreds of MB within 100 ms)."""
    total = 0
    for p in _tree_pids(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
    return total


def reset_hwm(pid: int) -> bool:
    """Reset VmHWM of the tree to the current RSS (Linux: write 5 to clear_refs); False where not allowed."""
    ok = True
    for p in _tree_pids(pid):
        try:
            Path(f"/proc/{p}/clear_refs").write_text("5")
        except OSError:
            ok = False
    return ok


class RssSampler:
    """Peak RSS of a process tree, sampled in a thread and read from VmHWM; ``mark()`` starts a new window."""

    def __init__(self, pid: int, every: float = 0.02) -> None:
        self.pid, self.every = pid, every
        self.peak = 0
        self.hwm_resettable = reset_hwm(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, tree_rss_bytes(self.pid))

    def mark(self) -> int:
        """Peak since the last mark (then reset to the current RSS): the larger of the samples and VmHWM."""
        hwm = tree_hwm_bytes(self.pid) if self.hwm_resettable else 0
        peak, self.peak = self.peak, tree_rss_bytes(self.pid)
        if self.hwm_resettable:
            reset_hwm(self.pid)
        return max(peak, self.peak, hwm)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# ----- a minimal HTTP/1.1 client on asyncio streams (cheap on CPU, full control of Expect) -------------------

def multipart(data: bytes, name: str) -> tuple[bytes, bytes]:
    head = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    return head, data + f"\r\n--{BOUNDARY}--\r\n".encode()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    line = await reader.readline()
    if not line:
        raise ConnectionError("connection closed before a response")
    status = int(line.split()[1])
    headers: dict[str, str] = {}
    while True:
        h = await reader.readline()
        if h in (b"\r\n", b"\n", b""):
            break
        k, _, v = h.decode("latin-1").partition(":")
        headers[k.strip().lower()] = v.strip()
    n = int(headers.get("content-length", "0"))
    body = await reader.readexactly(n) if n else b""
    return status, headers, body


async def post(reader, writer, port: int, data: bytes, name: str, expect: bool = False,
               keep_alive: bool = True) -> tuple[int, dict[str, str], bytes]:
    head, tail = multipart(data, name)
    length = len(head) + len(tail)
    req = (f"POST /api/predict HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: multipart/form-data; "
           f"boundary={BOUNDARY}\r\nContent-Length: {length}\r\n"
           + ("Expect: 100-continue\r\n" if expect else "")
           + ("" if keep_alive else "Connection: close\r\n") + "\r\n").encode()
    writer.write(req)
    await writer.drain()
    if expect:
        status, headers, body = await read_response(reader)
        if status != 100:
            return status, headers, body  # refused before the body was sent
    writer.write(head)
    writer.write(tail)
    await writer.drain()
    while True:
        status, headers, body = await read_response(reader)
        if status != 100:
            return status, headers, body


@dataclass
class LoadResult:
    latencies: list[float] = field(default_factory=list)
    codes: dict[str, int] = field(default_factory=dict)
    batch_sizes: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def count(self, code: str) -> None:
        self.codes[code] = self.codes.get(code, 0) + 1


async def steady_load(port: int, photos: list[tuple[bytes, str]], clients: int, duration: float,
                      max_requests: int) -> LoadResult:
    result = LoadResult()
    stop_at = time.perf_counter() + duration
    sent = 0

    async def client(i: int) -> None:
        nonlocal sent
        rng = random.Random(i)
        reader = writer = None
        while time.perf_counter() < stop_at and sent < max_requests:
            sent += 1
            data, name = photos[rng.randrange(len(photos))]
            t0 = time.perf_counter()
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(HOST, port)
                status, headers, body = await asyncio.wait_for(post(reader, writer, port, data, name), 60)
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError, ValueError) as e:
                result.count(type(e).__name__)
                if writer is not None:
                    writer.close()
                reader = writer = None
                continue
            result.latencies.append(time.perf_counter() - t0)
            result.count(str(status))
            if status == 200:
                result.batch_sizes.append(int(json.loads(body)["timing_ms"].get("batch_size") or 1))
            if headers.get("connection", "").lower() == "close":
                writer.close()
                reader = writer = None
        if writer is not None:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    result.seconds = time.perf_counter() - t0
    return result


async def burst(port: int, uploads: list[tuple[bytes, str]], expect: bool = True,
                timeout: float = 300) -> LoadResult:
    """All uploads at once, one connection each."""
    result = LoadResult()

    async def one(data: bytes, name: str) -> None:
        t0 = time.perf_counter()
        try:
            reader, writer = await asyncio.open_connection(HOST, port)
            try:
                status, _, _ = await asyncio.wait_for(post(reader, writer, port, data, name, expect=expect,
                                                           keep_alive=False), timeout)
            finally:
                writer.close()
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError, ValueError) as e:
            result.count(type(e).__name__)
            return
        result.latencies.append(time.perf_counter() - t0)
        result.count(str(status))

    t0 = time.perf_counter()
    await asyncio.gather(*(one(d, n) for d, n in uploads))
    result.seconds = time.perf_counter() - t0
    return result


# ----- inputs ----------------------------------------------------------------------------------------------------

def msld_photos(limit: int = 200) -> list[tuple[bytes, str]]:
    from mpoxscope.data.samples import msld_root

    files = sorted(p for p in Path(msld_root(), "images").rglob("*.jpg"))
    if not files:
        sys.exit(f"no MSLD v2.0 photos under {msld_root()}/images (set MPOXSCOPE_MSLD)")
    random.Random(0).shuffle(files)
    return [(p.read_bytes(), p.name) for p in files[:limit]]


def big_jpeg(target_bytes: int = 15_000_000) -> bytes:
    """A decodable JPEG of about ``target_bytes``: a real-looking photo is too compressible, so fine noise."""
    def encode(side: int) -> bytes:
        arr = np.random.default_rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=100, subsampling=0)
        return buf.getvalue()

    probe = 512
    per_pixel = len(encode(probe)) / probe**2  # noise compresses the same everywhere: size ~ pixels
    return encode(int((target_bytes / per_pixel) ** 0.5))


def near_limit_png(pixels: int = 63_900_000) -> bytes:
    """An 8-bit RGBA PNG of about ``pixels`` pixels that compresses to a few hundred kB (uniform skin colour)."""
    side = int(pixels ** 0.5)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    comp = zlib.compressobj(9)
    row = b"\x00" + bytes((205, 150, 125, 255)) * side
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# ----- offline throughput of the same runtime --------------------------------------------------------------------

class Offline:
    """The runtime the server runs (same registry entry, same file), in this process: images/s of JPEG bytes ->
    decode -> ``predict_images``, the work the server does per photo, with no HTTP and no queue."""

    def __init__(self, run: str, runtime: str, onnx_file: str | None, photos: list[tuple[bytes, str]]) -> None:
        from mpoxscope.data.images import decode_image
        from mpoxscope.engine.runtimes import load_predictor

        self.decode = decode_image
        self.predictor = load_predictor(run, runtime, "cpu", onnx_file)
        self.batches = [photos[i:i + 16] for i in range(0, len(photos) - 15, 16)]
        self.predictor.predict_images([decode_image(d) for d, _ in self.batches[0]])  # warm-up

    def measure(self, seconds: float, per_pass: int = 16) -> float:
        """Images/s over ``seconds``: batches of 16 photos, predicted ``per_pass`` photos per call."""
        done, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            batch = [self.decode(d) for d, _ in self.batches[done // 16 % len(self.batches)]]
            for i in range(0, 16, per_pass):
                self.predictor.predict_images(batch[i:i + per_pass], per_pass)  # one forward pass per call
            done += 16
        return done / (time.perf_counter() - t0)

    def close(self) -> None:
        del self.predictor


def model_summary(run: str, predictor: object) -> dict:
    """What the rows measured: backbone, head, image size, test-time views, photos per forward pass."""
    from mpoxscope.engine.passes import photos_per_forward, views_per_photo

    meta = json.loads(Path(run, "model.json").read_text())
    views = views_per_photo(predictor)
    size = int(meta.get("image_size", 224))
    cfg = meta.get("model") or {}
    name = "ensemble" if meta.get("kind") == "ensemble" else f"{cfg.get('backbone')} + {cfg.get('head')}"
    return {"model": name, "image_size": size, "views": views, "forward_photos": photos_per_forward(views, size)}


# ----- CPU accounting: how much of the machine the load generator takes ---------------------------------------

def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process tree (all threads), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in _tree_pids(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / tick


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all cores), from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def self_cpu_seconds() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


# ----- the server ------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_server(run: str, runtime: str, onnx_file: str | None, port: int, extra: list[str]) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("mpoxscope")
    cmd = [str(exe), "serve", run, "--host", HOST, "--port", str(port), "--runtime", runtime, "--device", "cpu",
           "--log-level", "warning", *extra]
    if onnx_file:
        cmd += ["--onnx", onnx_file]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    deadline = time.time() + START_TIMEOUT
    while True:
        try:
            with socket.create_connection((HOST, port), timeout=1) as s:
                s.sendall(f"GET /api/health HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
                if b"200 OK" in s.recv(100):
                    return proc
        except OSError:
            pass
        if proc.poll() is not None:
            sys.exit(f"server exited: {proc.stderr.read()}")
        if time.time() > deadline:
            proc.kill()
            sys.exit(f"server did not start within {START_TIMEOUT:.0f} s")
        time.sleep(0.5)


def stop_server(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err


# ----- one configuration ------------------------------------------------------------------------------------------

def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def offline_round(offline: Offline | None, seconds: float, forward_photos: int) -> dict:
    """Offline images/s at batch 16 and at the server's forward-pass size, measured back to back."""
    if offline is None or seconds <= 0:
        return {"batch16": float("nan"), "forward": float("nan")}
    return {"batch16": offline.measure(seconds, 16), "forward": offline.measure(seconds, forward_photos)}


def steady_phase(args, port: int, photos, server_pid: int) -> tuple[LoadResult, dict]:
    """The clients' run, with the CPU seconds of the load generator, the server and the whole machine."""
    if not args.clients or args.duration <= 0:
        return LoadResult(seconds=float("nan")), {}
    cpu0 = (self_cpu_seconds(), tree_cpu_seconds(server_pid), machine_busy_seconds())
    steady = asyncio.run(steady_load(port, photos, args.clients, args.duration, args.max_requests))
    cpu1 = (self_cpu_seconds(), tree_cpu_seconds(server_pid), machine_busy_seconds())
    gen, server, busy = (b - a for a, b in zip(cpu0, cpu1))
    capacity = steady.seconds * (os.cpu_count() or 1)
    return steady, {"loadgen_cpu_s": gen, "server_cpu_s": server, "machine_busy_cpu_s": busy,
                    "others_cpu_s": max(0.0, busy - gen - server), "capacity_cpu_s": capacity}


def run_config(args, runtime: str, onnx_file: str | None, photos, big, png) -> dict:
    label = runtime + (f" ({Path(onnx_file).name})" if onnx_file else "")
    measure_offline = args.offline_seconds > 0 and args.clients and args.duration > 0
    offline = Offline(args.run, runtime, onnx_file, photos) if measure_offline else None
    if offline is not None:
        model = model_summary(args.run, offline.predictor)
    else:
        from mpoxscope.engine.runtimes import load_predictor

        model = model_summary(args.run, load_predictor(args.run, runtime, "cpu", onnx_file))
    print(f"[{label}] {model}; offline throughput (before) ...", file=sys.stderr, flush=True)
    before = offline_round(offline, args.offline_seconds, model["forward_photos"])
    port = free_port()
    proc = start_server(args.run, runtime, onnx_file, port, args.server_arg)
    sampler = RssSampler(proc.pid)
    try:
        time.sleep(2)
        idle_rss = tree_rss_bytes(proc.pid)
        sampler.mark()
        print(f"[{label}] {args.clients} clients x {args.duration:.0f} s ...", file=sys.stderr, flush=True)
        steady, cpu = steady_phase(args, port, photos, proc.pid)
        steady_rss = sampler.mark()
        print(f"[{label}] offline throughput (after) ...", file=sys.stderr, flush=True)
        after = offline_round(offline, args.offline_seconds, model["forward_photos"])
        sampler.mark()
        print(f"[{label}] burst of {args.burst} x {len(big) / 1e6:.0f} MB ...", file=sys.stderr, flush=True)
        burst_result = asyncio.run(burst(port, [(big, f"big{i}.jpg") for i in range(args.burst)]))
        burst_rss = sampler.mark()
        print(f"[{label}] 4 near-limit PNGs ...", file=sys.stderr, flush=True)
        png_result = asyncio.run(burst(port, [(png, f"limit{i}.png") for i in range(4)]))
        png_rss = sampler.mark()
    finally:
        sampler.stop()
        log = stop_server(proc)
        if offline is not None:
            offline.close()
    ok = steady.codes.get("200", 0)
    errors = sum(n for c, n in steady.codes.items() if c != "200")
    offline_ips = float(np.mean([before["batch16"], after["batch16"]]))
    return {
        "label": label, **model, "offline_ips": offline_ips, "offline_before": before, "offline_after": after,
        "throughput": ok / steady.seconds, "seconds": steady.seconds,
        "ok": ok, "errors": errors, "codes": steady.codes, "p50_ms": 1000 * pct(steady.latencies, 50),
        "p99_ms": 1000 * pct(steady.latencies, 99), "cpu": cpu,
        "mean_batch": statistics.mean(steady.batch_sizes) if steady.batch_sizes else float("nan"),
        "idle_rss": idle_rss, "steady_rss": steady_rss, "burst_codes": burst_result.codes,
        "burst_seconds": burst_result.seconds, "burst_rss": burst_rss, "png_codes": png_result.codes,
        "png_rss": png_rss, "server_log_tracebacks": log.count("Traceback"),
        "peak_method": "VmHWM (reset per phase) and 20 ms samples" if sampler.hwm_resettable else "20 ms samples",
    }


def _codes(codes: dict) -> str:
    return ", ".join(f"{n}× {c}" for c, n in sorted(codes.items())) or "none"


def _steady_rows(results: list[dict]) -> list[str]:
    gb = 1e9
    rows = ["| runtime | model (views, photos per forward pass) | requests/s | offline batch-16 img/s (before, "
            "after) | ratio | offline img/s at the server's pass size | p50 ms | p99 ms | errors | mean batch | "
            "peak RSS |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        b, a = r["offline_before"], r["offline_after"]
        rows.append(
            f"| {r['label']} | {r['model']} {r['image_size']} px ({r['views']} views, {r['forward_photos']}) | "
            f"{r['throughput']:.2f} | {r['offline_ips']:.2f} ({b['batch16']:.2f}, {a['batch16']:.2f}) | "
            f"{100 * r['throughput'] / r['offline_ips']:.0f} % | "
            f"{(b['forward'] + a['forward']) / 2:.2f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
            f"{r['errors']} of {r['ok'] + r['errors']} | {r['mean_batch']:.1f} | {r['steady_rss'] / gb:.2f} GB |")
    rows += ["", "CPU during the steady phase (seconds of CPU; capacity = wall time × cores):", "",
             "| runtime | load generator | server | other processes | machine busy | capacity | "
             "load generator share |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        c = r["cpu"]
        if c:
            rows.append(f"| {r['label']} | {c['loadgen_cpu_s']:.1f} | {c['server_cpu_s']:.1f} | "
                        f"{c['others_cpu_s']:.1f} | {c['machine_busy_cpu_s']:.1f} | {c['capacity_cpu_s']:.1f} | "
                        f"{100 * c['loadgen_cpu_s'] / c['capacity_cpu_s']:.1f} % of the machine, "
                        f"{100 * c['loadgen_cpu_s'] / max(1e-9, c['server_cpu_s']):.1f} % of the server's |")
    return rows


def render(args, results: list[dict], big_mb: float, png_kb: float, load: tuple, minutes: float) -> str:
    gb = 1e9
    contended = max(load[0][0], load[1][0]) > 0.5 * (os.cpu_count() or 1)
    nice = os.nice(0)
    steady_run = bool(args.clients and args.duration > 0)
    lines = [
        "# Web service under load (127.0.0.1)",
        "",
        f"Command: `{'nice -n ' + str(nice) + ' ' if nice else ''}.venv/bin/python {' '.join(sys.argv)}` "
        f"({minutes:.1f} min, finished {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}).",
        "",
        f"Machine: {os.cpu_count()} logical CPUs shared by the server, the load generator (same machine) and "
        f"other jobs; load average {', '.join(f'{x:.1f}' for x in load[0])} at the start, "
        f"{', '.join(f'{x:.1f}' for x in load[1])} at the end: "
        + ("**contended** — absolute numbers are pessimistic, and the ratio compares two contended "
           "measurements." if contended else "quiet."),
        "",
        f"Server: `mpoxscope serve` defaults (max batch 16, batch wait 5 ms, queue 64, 128 MB of uploads held) "
        f"{' '.join(args.server_arg)}. Photos: {args.photos} real MSLD v2.0 JPEGs (about 11 kB, 224 px), read "
        "into memory before the run, chosen at random per request by an asyncio HTTP/1.1 client (keep-alive, "
        "one process). Offline: the same runtime (same registry entry and file) in the load generator's "
        "process, JPEG bytes -> decode -> predict_images, 16 photos per call (the issue's batch 16) and at "
        "the server's forward-pass size; measured before the server starts and again after the steady phase "
        f"({args.offline_seconds:g} s each); the ratio uses the mean of the two batch-16 figures. Peak RSS: "
        f"{results[0]['peak_method'] if results else ''}, of the server process.",
        "",
        f"## {args.clients} concurrent clients, {args.duration:g} s",
        "",
    ]
    lines += _steady_rows(results) if steady_run else ["Not run in this invocation (`--clients 0`)."]
    lines += ["", f"## Burst: {args.burst} concurrent uploads of {big_mb:.1f} MB (JPEG, Expect: 100-continue)", "",
              "| runtime | answers | wall s | peak RSS (idle RSS) |", "|---|---|---:|---:|"]
    for r in results:
        lines.append(f"| {r['label']} | {_codes(r['burst_codes'])} | {r['burst_seconds']:.1f} | "
                     f"{r['burst_rss'] / gb:.2f} GB ({r['idle_rss'] / gb:.2f} GB) |")
    lines += ["", f"## 4 concurrent near-limit PNGs (RGBA, ~64 MP, {png_kb:.0f} kB each)", "",
              "| runtime | answers | peak RSS |", "|---|---|---:|"]
    for r in results:
        lines.append(f"| {r['label']} | {_codes(r['png_codes'])} | {r['png_rss'] / gb:.2f} GB |")
    lines += ["", "Tracebacks in the server logs: "
              + ", ".join(f"{r['label']}: {r['server_log_tracebacks']}" for r in results) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--config", action="append", help="RUNTIME[:ONNX_FILE]; repeatable (default: torch)")
    ap.add_argument("--clients", type=int, default=32, help="0: skip the steady-load phase")
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--max-requests", type=int, default=100_000)
    ap.add_argument("--photos", type=int, default=200)
    ap.add_argument("--burst", type=int, default=100)
    ap.add_argument("--offline-seconds", type=float, default=20.0, help="0: skip the offline measurement")
    ap.add_argument("--server-arg", action="append", default=[], help="extra `mpoxscope serve` argument")
    ap.add_argument("--out", default="benchmarks/results/serve_load.md")
    args = ap.parse_args()
    args.config = args.config or ["torch"]
    t0, load0 = time.perf_counter(), os.getloadavg()
    photos = msld_photos(args.photos)
    big, png = big_jpeg(), near_limit_png()
    results = []
    for cfg in args.config:
        runtime, _, onnx_file = cfg.partition(":")
        results.append(run_config(args, runtime, onnx_file or None, photos, big, png))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    text = render(args, results, len(big) / 1e6, len(png) / 1e3, (load0, os.getloadavg()),
                  (time.perf_counter() - t0) / 60)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(
        {"command": " ".join([".venv/bin/python", *sys.argv]), "nice": os.nice(0), "cpus": os.cpu_count(),
         "load_average": {"start": load0, "end": os.getloadavg()}, "results": results}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
