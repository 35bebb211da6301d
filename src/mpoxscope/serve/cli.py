"""``mpoxscope serve``: the web page and JSON API for a trained run."""

from __future__ import annotations

import argparse
import socket
import sys

from mpoxscope.errors import MpoxscopeError

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
    p.add_argument("--runtime", choices=["torch", "onnx"], default="torch",
                   help="inference engine: torch (default) or onnx (ONNX Runtime, RUN/model.onnx, exported "
                        "when missing; heat-maps still use the torch model)")
    p.add_argument("--device", default="auto", help="torch device: auto | cpu | cuda[:N] (default auto)")
    p.add_argument("--max-concurrency", type=int, default=2, metavar="N",
                   help="photos classified at once (default 2); further requests wait in line")
    p.add_argument("--max-upload-mb", type=float, default=20.0, metavar="MB",
                   help="largest accepted upload in megabytes (default 20)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(handler=run_serve)


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


def run_serve(args: argparse.Namespace) -> int:
    from mpoxscope.engine.checkpoint import read_meta

    read_meta(args.run)  # a wrong folder is reported before anything else happens
    sock = bind(args.host, args.port)
    port = sock.getsockname()[1]
    try:
        import uvicorn

        from mpoxscope.serve.app import create_app

        app = create_app(args.run, runtime=args.runtime, device=args.device,
                         max_concurrency=args.max_concurrency,
                         max_upload_bytes=int(args.max_upload_mb * 1_000_000))
        shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
        print(f"mpoxscope serve: http://{shown}:{port}/  (API docs: /docs; stop with Ctrl+C)",
              file=sys.stderr)
        if args.host not in LOCAL_HOSTS:
            print("mpoxscope serve: warning: listening on every network interface without authentication or "
                  "HTTPS; anyone who can reach this computer can upload photos. Use only on a network you "
                  "trust.", file=sys.stderr)
        config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5)
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl+C after its graceful shutdown: a normal way to stop
        pass
    finally:
        sock.close()
    return 0
