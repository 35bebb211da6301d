"""``mpoxscope serve``: the web page and JSON API for a trained run."""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys

from mpoxscope.errors import MpoxscopeError
from mpoxscope.registry import RUNTIMES, Choices

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve", help="web page + JSON API to classify photos (FastAPI, docs at /docs)",
        description="Serve a trained run: a web page at / (pick, drop or take a photo), a JSON API at "
                    "/api/predict, /api/model and /api/health, and OpenAPI docs at /docs. Research use only: "
                    "the answers are not diagnoses.")
    p.add_argument("run", help="run directory (model.json + best.safetensors) written by 'mpoxscope train'")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this computer only; 0.0.0.0: every network "
                        "interface, e.g. to open the page from a phone on the same Wi-Fi)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--runtime", choices=Choices(RUNTIMES), default="torch", metavar="RUNTIME",
                   help="inference engine: %(choices)s (default torch): torch, onnx (ONNX Runtime, "
                        "RUN/model.onnx, exported when missing), onnx-int8 (RUN/model.int8.onnx) or onnx-lite "
                        "(ONNX Runtime with Pillow + numpy preprocessing instead of torchvision: faster, "
                        "probabilities within rounding); heat-maps use the torch model")
    p.add_argument("--device", default="auto", help="torch device: auto | cpu | cuda[:N] (default auto)")
    p.add_argument("--onnx", dest="onnx_file", metavar="FILE",
                   help="this exported file instead of RUN/model.onnx, e.g. RUN/model.int8.onnx from "
                        "'mpoxscope export --quantize int8' (implies --runtime onnx unless onnx-lite is given)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="server processes, each with its own copy of the model, sharing the port (default 1); "
                        "torch/ONNX threads per process = CPU cores / N unless OMP_NUM_THREADS is set")
    p.add_argument("--max-batch", type=int, default=16, metavar="N",
                   help="photos from concurrent requests classified in one forward pass (default 16)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0, metavar="MS",
                   help="how long a batch waits for more photos once it has one (default 5 ms); under load "
                        "batches fill from the queue without waiting")
    p.add_argument("--max-concurrency", type=int, default=1, metavar="N",
                   help="forward passes (batches) run at once per process (default 1)")
    p.add_argument("--queue-size", type=int, default=64, metavar="N",
                   help="requests held at once per process (uploading, decoding, waiting); beyond it the "
                        "server answers 503 with Retry-After before reading the upload (default 64)")
    p.add_argument("--max-buffered-mb", type=float, default=128.0, metavar="MB",
                   help="upload bytes held at once per process, by Content-Length; beyond it 503 (default 128)")
    p.add_argument("--body-timeout", type=float, default=60.0, metavar="S",
                   help="an upload must arrive within S seconds, else 408 (default 60)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, metavar="MB",
                   help="largest accepted upload in megabytes (default 20)")
    p.add_argument("--allowed-hosts", nargs="+", default=[], metavar="NAME",
                   help="further Host header names to answer (e.g. a DNS name or reverse proxy); by default "
                        "only the --host address and localhost names are answered, others get 400 (DNS "
                        "rebinding). '*.example.org' allows sub-domains, '*' disables the check")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    # A long-lived server keeps its C allocator's defaults (it trims freed memory itself): no batch tuning.
    p.set_defaults(handler=run_serve, long_lived=True)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, so a busy port is a one-line error before the model loads."""
    if not 0 <= port < 65536:
        raise MpoxscopeError(f"--port: must be 0..65535 (0: any free port), got {port}")
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise MpoxscopeError(f"--host: cannot resolve {host!r} ({e.strerror})") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise MpoxscopeError(f"--port: cannot listen on {host}:{port} ({e.strerror}); is another server "
                             f"running? try --port {port + 1}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _settings(args: argparse.Namespace) -> dict:
    """create_app's arguments from the command line (JSON-serialisable: handed to worker processes)."""
    from mpoxscope.serve.app import default_allowed_hosts
    from mpoxscope.serve.service import ServeConfig

    if args.workers < 1:
        raise MpoxscopeError(f"--workers: must be at least 1, got {args.workers}")
    for option, value in (("--max-upload-mb", args.max_upload_mb), ("--max-buffered-mb", args.max_buffered_mb),
                          ("--batch-wait-ms", args.batch_wait_ms), ("--body-timeout", args.body_timeout)):
        if not math.isfinite(value) or value < 0:  # int(nan), int(inf) would be tracebacks
            raise MpoxscopeError(f"{option}: must be a finite number of at least 0, got {value}")
    if args.onnx_file and args.runtime == "torch":
        args.runtime = "onnx"
    if args.onnx_file and not os.path.isfile(args.onnx_file):
        raise MpoxscopeError(f"--onnx: {args.onnx_file}: file not found")
    settings = {"run_dir": str(args.run), "runtime": args.runtime, "device": args.device,
                "onnx_file": args.onnx_file, "max_concurrency": args.max_concurrency,
                "max_upload_bytes": int(args.max_upload_mb * 1_000_000), "max_batch": args.max_batch,
                "batch_wait_ms": args.batch_wait_ms, "queue_size": args.queue_size,
                "max_buffered_bytes": int(args.max_buffered_mb * 1_000_000), "body_timeout_s": args.body_timeout,
                "allowed_hosts": list(default_allowed_hosts(args.host, args.allowed_hosts))}
    ServeConfig(**{k: settings[k] for k in ("max_concurrency", "max_upload_bytes", "max_batch", "batch_wait_ms",
                                             "queue_size", "max_buffered_bytes", "body_timeout_s")})  # validate
    return settings


def run_serve(args: argparse.Namespace) -> int:
    from mpoxscope.engine.checkpoint import read_meta

    read_meta(args.run)  # a wrong folder is reported before anything else happens
    settings = _settings(args)
    sock = bind(args.host, args.port)
    port = sock.getsockname()[1]
    try:
        import uvicorn

        shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
        if args.workers == 1:
            from mpoxscope.serve.app import create_app

            app = create_app(**{**settings, "allowed_hosts": tuple(settings["allowed_hosts"])})
            config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5)
        else:
            from mpoxscope.serve.app import APP_ENV

            # Each worker builds its own app (and model) from these settings; the cores are shared out.
            if "OMP_NUM_THREADS" not in os.environ:
                settings["torch_threads"] = max(1, (os.cpu_count() or 1) // args.workers)
            os.environ[APP_ENV] = json.dumps(settings)
            config = uvicorn.Config("mpoxscope.serve.app:app_from_environment", factory=True,
                                    workers=args.workers, log_level=args.log_level, timeout_graceful_shutdown=5)
        print(f"mpoxscope serve: http://{shown}:{port}/  (API docs: /docs; {args.workers} worker process"
              f"{'es' if args.workers > 1 else ''}; stop with Ctrl+C)", file=sys.stderr)
        if args.host not in LOCAL_HOSTS:
            print("mpoxscope serve: warning: listening on every network interface without authentication or "
                  "HTTPS; anyone who can reach this computer can upload photos. Use only on a network you "
                  "trust.", file=sys.stderr)
        if args.workers == 1:
            uvicorn.Server(config).run(sockets=[sock])
        else:
            from uvicorn.supervisors import Multiprocess

            Multiprocess(config, sockets=[sock]).run()
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl+C after its graceful shutdown: a normal way to stop
        pass
    finally:
        sock.close()
    return 0
