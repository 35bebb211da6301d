"""The FastAPI application: a JSON API around :class:`InferenceService` and a single offline web page.

A request to /api/predict is first admitted (at most ``queue_size`` requests and ``max_buffered_bytes`` of
declared upload held at once; otherwise 503 with Retry-After before any of the body is read), then its body is
read within ``body_timeout_s`` (else 408), decoded in a worker thread, and handed to a
:class:`~mpoxscope.serve.batching.MicroBatcher`, which groups photos from concurrent requests into one forward
pass (at most ``max_batch``, waiting at most ``batch_wait_ms`` for company). The event loop stays free to
accept uploads throughout.
"""

from __future__ import annotations

import asyncio
import dataclasses
import html
import ipaddress
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import anyio
import numpy as np
from fastapi import FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.requests import ClientDisconnect

from mpoxscope import __version__
from mpoxscope.engine.passes import photos_per_forward, views_per_photo
from mpoxscope.serve.batching import (
    Admission,
    MicroBatcher,
    PixelBudget,
    QueueFull,
    release_free_memory,
    retry_after_seconds,
)
from mpoxscope.serve.service import (
    DISCLAIMER,
    INTENDED_USE,
    InferenceService,
    ModelIdentity,
    PredictorLike,
    ServeConfig,
    explain_module,
    load_service,
    torch_copy_loader,
)
from mpoxscope.serve.upload import (
    MULTIPART_OVERHEAD,
    DecodedImage,
    Upload,
    UploadError,
    read_upload,
    sniff_image,
)

log = logging.getLogger("mpoxscope.serve")

STATIC_DIR = Path(__file__).parent / "static"
UPLOAD_FIELD = "file"

#: The page may load nothing from elsewhere: it has to work offline, and a photo of someone's skin must not
#: leak to third parties. Images come from the page itself, data: (heat-map) and blob: (the local preview).
PAGE_CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
            "frame-ancestors 'none'")


# ----- response schemas (for /docs and for validating our own output) ---------------------------------------

class ErrorBody(BaseModel):
    detail: str = Field(description="What is wrong with the request, in one line")


class ModelRef(BaseModel):
    name: str
    version: str = Field(description="First 12 hex digits of the SHA-256 of the weights")
    runtime: Literal["torch", "onnx"] | str
    run: str


class ExplanationBody(BaseModel):
    method: str
    target_class: str = Field(description="The class the heat-map explains (the top class)")
    overlay_png_base64: str = Field(description="PNG of the photo with the heat-map blended over it, base64")
    width: int
    height: int


class ImageBody(BaseModel):
    format: str = Field(description="Format sniffed from the bytes (never from the file name)")
    width: int
    height: int


class TimingBody(BaseModel):
    queued: float = Field(description="Waiting for the photo's micro-batch to start")
    decode: float
    inference: float = Field(description="The forward pass of the whole micro-batch")
    batch_size: int | None = Field(None, description="Photos in the micro-batch this one was classified in")
    explain: float | None
    total: float


class DecisionBody(BaseModel):
    kind: Literal["refer_target", "uncertain", "class"] = Field(
        description="refer_target: P(screened class) reached the screening threshold, or it is the top class; "
                    "uncertain: top probability below the abstain threshold; class: the top class")
    label: str = Field(description="'possible Mpox', 'uncertain' or the class name")
    text: str = Field(description="What to show: the same text as `mpoxscope predict` prints")


class ScreeningBody(BaseModel):
    target_class: str
    threshold: float = Field(description="Refer when P(target_class) >= threshold (chosen on validation)")
    target_sensitivity: float | None
    source: str | None


class PredictBody(BaseModel):
    decision: DecisionBody
    screening: ScreeningBody | None = Field(description="The run's screening rule; null when it has none")
    top_class: str
    top_probability: float
    probabilities: dict[str, float] = Field(description="Every class, in the model's class order")
    abstain: bool = Field(description="True when top_probability < abstain_threshold: refer to a clinician")
    abstain_threshold: float
    threshold_source: Literal["calibration", "default"]
    message: str
    disclaimer: str
    model: ModelRef
    image: ImageBody
    explanation: ExplanationBody | None
    timing_ms: TimingBody


class HealthBody(BaseModel):
    status: Literal["ok"]
    model: ModelRef
    version: str


class ExplainMethodsBody(BaseModel):
    methods: list[str]
    available: bool
    reason: str | None = Field(None, description="Why explanations are unavailable, when they are")


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "Malformed form, no 'file' field, empty file, bad explain"},
    408: {"model": ErrorBody, "description": "The upload did not arrive within the body timeout"},
    413: {"model": ErrorBody, "description": "Upload over the byte limit or image over the pixel limit"},
    415: {"model": ErrorBody, "description": "Not multipart/form-data, or not a supported image"},
    422: {"model": ErrorBody, "description": "A recognised image format that cannot be decoded (truncated)"},
    503: {"model": ErrorBody, "description": "Queue full: retry after the Retry-After header's seconds"},
}

UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": [UPLOAD_FIELD],
    "properties": {UPLOAD_FIELD: {"type": "string", "format": "binary",
                                  "description": "A photo: JPEG, PNG, WebP, AVIF, BMP, GIF or TIFF"}}}}}}}


# ----- the application ------------------------------------------------------------------------------------

def _safe_name(name: str) -> str:
    """The client's file name for messages: printable and short (it is never used as a path)."""
    cleaned = "".join(ch if ch.isprintable() else "?" for ch in os.path.basename(name.replace("\\", "/")))
    return (cleaned[:80] or "upload")


# ----- Host header check (DNS rebinding) --------------------------------------------------------------------

LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
ANY_ADDRESS = ("0.0.0.0", "::")


def host_of(header: str) -> str:
    """The host part of a Host header, lower-case, without port or IPv6 brackets."""
    value = header.strip().lower()
    if value.startswith("["):  # [::1]:8000
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    """Whether ``host`` (from :func:`host_of`) is one ``allowed`` names. Entries: exact names, ``*.domain``
    (any sub-domain), ``*`` (anything). When the server listens on every interface (0.0.0.0 or ::), any IP
    address is accepted: a DNS-rebinding page reaches the server through a *name*, never an IP literal."""
    if not host:
        return False
    for entry in allowed:
        entry = entry.lower()
        if entry == "*" or host == entry or (entry.startswith("*.") and host.endswith(entry[1:])):
            return True
    return any(a in ANY_ADDRESS for a in allowed) and _is_ip(host)


def default_allowed_hosts(bound: str, extra: list[str] | tuple[str, ...] = ()) -> tuple[str, ...]:
    """The bound host, the local names, and ``extra`` (``--allowed-hosts``)."""
    names = [host_of(bound) if bound.startswith("[") else bound.lower(), *LOCAL_NAMES]
    names += [e.strip().lower() for e in extra if e.strip()]
    return tuple(dict.fromkeys(names))


# ----- the local API documentation page ---------------------------------------------------------------------

DOCS_CSP = "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; frame-ancestors 'none'"


def docs_page(spec: dict[str, Any]) -> str:
    """A self-contained HTML page describing every endpoint of ``spec`` (OpenAPI), with no scripts and nothing
    loaded from elsewhere (FastAPI's Swagger UI fetches its code from a CDN and is blank offline)."""
    e = html.escape
    info = spec.get("info", {})
    parts = [f"<h1>{e(info.get('title', 'API'))} {e(str(info.get('version', '')))}</h1>",
             f"<p>{e(info.get('summary', ''))}</p><p>{e(info.get('description', ''))}</p>",
             "<p>Machine-readable schema: <a href='/openapi.json'>/openapi.json</a>. Example: "
             "<code>curl -F file=@photo.jpg 'http://127.0.0.1:8000/api/predict?explain=gradcam'</code></p>"]
    for path, methods in spec.get("paths", {}).items():
        for verb, op in methods.items():
            parts.append(f"<h2><code>{e(verb.upper())} {e(path)}</code></h2><p>{e(op.get('summary', ''))}</p>")
            params = op.get("parameters", [])
            if params:
                rows = "".join(f"<li><code>{e(q['name'])}</code> ({e(q.get('in', ''))}): "
                               f"{e(q.get('description', ''))}</li>" for q in params)
                parts.append(f"<p>Parameters:</p><ul>{rows}</ul>")
            if "requestBody" in op:
                kinds = ", ".join(op["requestBody"].get("content", {}))
                parts.append(f"<p>Body: <code>{e(kinds)}</code></p>")
            rows = "".join(f"<li><b>{e(code)}</b>: {e(r.get('description', ''))}</li>"
                           for code, r in op.get("responses", {}).items())
            parts.append(f"<p>Responses:</p><ul>{rows}</ul>")
    style = ("body{font-family:system-ui,sans-serif;max-width:52rem;margin:2rem auto;padding:0 1rem;"
             "line-height:1.45}code{background:#f2f2f2;padding:0 .2em}h2{font-size:1.05rem;margin-top:1.6rem}")
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{e(info.get('title', 'API'))} "
            f"API</title><meta name='viewport' content='width=device-width,initial-scale=1'><style>{style}</style>"
            f"</head><body>{''.join(parts)}</body></html>")


# ----- the application ------------------------------------------------------------------------------------

#: After decoding a photo this large, free memory is handed back to the system at once (milliseconds, against
#: the hundreds of milliseconds such a decode takes).
LARGE_DECODE_PIXELS = 8_000_000


class _Pipeline:
    """Per-application state built on first use: the admission counter, the micro-batcher and the decode
    limiter (an app served without its lifespan, e.g. Starlette's TestClient outside ``with``, still works)."""

    def __init__(self, service: InferenceService) -> None:
        config = service.config
        self.admission = Admission(config.queue_size, config.max_buffered_bytes,
                                   config.max_upload_bytes + MULTIPART_OVERHEAD)
        # A micro-batch runs as forward passes of a few photos: with 8 test-time views, 16 photos are 128
        # images in one pass (+1.5 GB of activations at 224 px); 2 photos (16 images) cost +0.22 GB.
        self.forward_photos = photos_per_forward(views_per_photo(service.predictor),
                                                 int(service.meta.get("image_size", 224)))
        self.batcher: MicroBatcher = MicroBatcher(self.predict_batch, max_batch=config.max_batch,
                                                  max_wait_s=config.batch_wait_ms / 1000.0,
                                                  workers=config.max_concurrency, name="mpoxscope-batch",
                                                  on_idle=release_free_memory)
        # Decoding a large photo takes tens of MB: a few at a time, whatever the queue holds, and never more
        # than one pixel limit's worth of photos at once (a 64 MP PNG decodes alone).
        self.decode_threads = max(2, min(4, os.cpu_count() or 2))
        self._decode_limiter: anyio.CapacityLimiter | None = None
        self.pixels = PixelBudget(config.max_pixels)
        self.service = service
        self.explain_loaded = False

    def predict_batch(self, images: list[Any]) -> np.ndarray:
        """One micro-batch's probabilities, in forward passes of at most ``forward_photos`` photos."""
        step = self.forward_photos
        return np.concatenate([self.service.predict_batch(images[i:i + step])
                               for i in range(0, len(images), step)])

    async def explain_ready(self) -> None:
        """Import the heat-map stack (grad-cam, matplotlib, OpenCV: ~150 MB and seconds) when it is first
        needed, in a worker thread so the event loop keeps serving: a server never asked for a heat-map
        never pays for it."""
        if not self.explain_loaded:
            await anyio.to_thread.run_sync(explain_module)
            self.explain_loaded = True

    def decode(self, data: bytes, name: str) -> tuple[DecodedImage, float]:
        """``service.decode`` within the pixel budget (runs in a worker thread)."""
        _, (w, h) = sniff_image(data, name, self.service.config.max_pixels)  # header only: cheap
        held = self.pixels.acquire(w * h)
        try:
            return self.service.decode(data, name)
        finally:
            self.pixels.release(held)
            if w * h >= LARGE_DECODE_PIXELS:  # its full-size pixels stay in this thread's arena otherwise
                release_free_memory()

    def decode_limiter(self) -> anyio.CapacityLimiter:
        if self._decode_limiter is None:
            self._decode_limiter = anyio.CapacityLimiter(self.decode_threads)
        return self._decode_limiter

    def retry_after(self, waiting: int) -> int:
        return retry_after_seconds(waiting, self.batcher.seconds_per_item)


def create_app_from_service(service: InferenceService) -> FastAPI:
    """The application around an already loaded service."""
    config = service.config
    pipeline = _Pipeline(service)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        pipeline.batcher.close()

    app = FastAPI(
        title="mpoxscope",
        version=__version__,
        summary="Mpox vs. look-alike skin diseases from a photo (AGFN). " + DISCLAIMER,
        description=INTENDED_USE,
        lifespan=lifespan,
        docs_url=None,  # replaced by a local page below: Swagger UI loads its code from a CDN
        redoc_url=None,
    )
    app.state.service = service
    app.state.pipeline = pipeline

    @app.exception_handler(UploadError)
    async def upload_error(request: Request, exc: UploadError) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def bad_parameter(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own answer is a 422 with a nested list; every other client error here is one line in a 400
        first = next(iter(exc.errors()), {})
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
        return JSONResponse({"detail": f"{where}: {first.get('msg', 'invalid value')}"}, status_code=400)

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, exc: QueueFull) -> JSONResponse:
        log.info("503 for %s: %s", request.url.path, exc.reason)
        return JSONResponse({"detail": exc.reason}, status_code=503,
                            headers={"Retry-After": str(exc.retry_after), "Connection": "close"})

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect) -> Response:
        # Not a server error: the client closed the connection mid-upload. One line, no traceback.
        client = f"{request.client.host}:{request.client.port}" if request.client else "client"
        log.info("%s disconnected during %s %s", client, request.method, request.url.path)
        return Response(status_code=400)  # nobody is listening any more; keeps the ASGI contract

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not the client's fault: JSON like every other answer, details in the server log only.
        log.exception("internal error on %s", request.url.path)
        return JSONResponse({"detail": f"internal server error ({type(exc).__name__})"}, status_code=500)

    @app.middleware("http")
    async def headers(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        if config.allowed_hosts is not None:
            host = host_of(request.headers.get("host", ""))
            if not host_allowed(host, config.allowed_hosts):
                shown = "".join(ch if ch.isprintable() else "?" for ch in host)[:80]
                log.info("400 for Host %r (not in the allowed hosts)", shown)
                return JSONResponse({"detail": f"Host {shown!r} is not served here; start the server with "
                                               f"--allowed-hosts {shown or 'NAME'} to allow it"},
                                    status_code=400, headers={"Connection": "close"})
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        path = request.url.path
        if path == "/" or path.startswith("/static/"):
            response.headers["Content-Security-Policy"] = PAGE_CSP
        elif path == "/docs":
            response.headers["Content-Security-Policy"] = DOCS_CSP
        if path.startswith("/api/predict"):
            response.headers["Cache-Control"] = "no-store"  # results about someone's skin stay out of caches
        return response

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(docs_page(app.openapi()))

    @app.get("/api/health", response_model=HealthBody, summary="Liveness: the model is loaded")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": dataclasses.asdict(service.identity), "version": __version__}

    @app.get("/api/model", summary="Classes, backbone, validation metrics, calibration, intended use")
    async def model() -> dict[str, Any]:
        await pipeline.explain_ready()  # the answer lists the heat-map methods
        return service.model_info()

    @app.get("/api/explain-methods", response_model=ExplainMethodsBody,
             summary="Heat-map methods accepted by /api/predict?explain=")
    async def explain_methods() -> dict[str, Any]:
        await pipeline.explain_ready()
        methods = service.explain_methods()
        reason = service.explain_unavailable_reason()
        return {"methods": methods, "available": bool(methods), "reason": reason}

    @app.post("/api/predict", response_model=PredictBody, responses=ERROR_RESPONSES,
              openapi_extra=UPLOAD_BODY,
              summary="Classify one photo (multipart field 'file'); ?explain=gradcam adds a heat-map")
    async def predict(request: Request, explain: str | None = Query(
            None, description="Heat-map method, e.g. gradcam (see /api/explain-methods); empty for none",
            max_length=40)) -> dict[str, Any]:
        if explain:
            await pipeline.explain_ready()
        method = service.check_method(explain) if explain else None  # refuse before reading the upload
        head = request.headers
        admission = pipeline.admission
        cost = admission.charge(head.get("content-length"))
        admission.enter(cost, pipeline.retry_after)  # 503 before a byte of the body is read
        try:
            try:
                with anyio.fail_after(config.body_timeout_s):
                    upload = await read_upload(request.stream(), head.get("content-type"),
                                               head.get("content-length"), UPLOAD_FIELD, config.max_upload_bytes)
            except TimeoutError:
                raise UploadError(408, f"the upload did not arrive within {config.body_timeout_s:g} s") from None
            return await classify(upload, method)
        finally:
            admission.leave(cost)

    async def classify(upload: Upload, method: str | None) -> dict[str, Any]:
        t_start = time.perf_counter()
        decoded, decode_ms = await anyio.to_thread.run_sync(pipeline.decode, upload.data,
                                                            _safe_name(upload.filename),
                                                            limiter=pipeline.decode_limiter())
        upload.data = b""  # the decoded photo is all that is needed from here on: free the upload's bytes
        submitted = time.perf_counter()
        probs, info = await asyncio.wrap_future(pipeline.batcher.submit(decoded.image))
        timing = {"queued": round(max(0.0, info.started - submitted) * 1000.0, 2), "decode": decode_ms,
                  "inference": round(info.seconds * 1000.0, 2), "batch_size": info.size}
        if method:  # a heat-map is seconds of work: off the event loop
            return await anyio.to_thread.run_sync(service.respond, decoded, probs, method, timing, t_start)
        return service.respond(decoded, probs, None, timing, t_start)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def create_app(run_dir: str | os.PathLike, runtime: str = "torch", device: str = "auto",
               max_concurrency: int = 1, max_upload_bytes: int = 20_000_000,
               onnx_file: str | os.PathLike | None = None, **limits: Any) -> FastAPI:
    """Load the run in ``run_dir`` with ``runtime`` ("torch" or "onnx", optionally from ``onnx_file``) and
    build the application; ``limits`` are further :class:`ServeConfig` fields (max_batch, queue_size, ...)."""
    config = ServeConfig(max_concurrency=max_concurrency, max_upload_bytes=max_upload_bytes, **limits)
    return create_app_from_service(load_service(run_dir, runtime=runtime, device=device, config=config,
                                                onnx_file=onnx_file))


#: Environment variable through which ``mpoxscope serve --workers N`` hands its settings to each worker.
APP_ENV = "MPOXSCOPE_SERVE_APP"


def app_from_environment() -> FastAPI:
    """The application described by ``$MPOXSCOPE_SERVE_APP`` (JSON of create_app's arguments): the uvicorn
    factory each worker process calls to load its own copy of the model."""
    import json

    settings = json.loads(os.environ[APP_ENV])
    threads = settings.pop("torch_threads", None)
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    allowed = settings.pop("allowed_hosts", None)
    return create_app(**settings, allowed_hosts=tuple(allowed) if allowed is not None else None)


def create_app_from_predictor(predictor: PredictorLike, config: ServeConfig | None = None, *,
                              name: str = "model", version: str = "unknown", runtime: str = "torch",
                              explain_model_loader: Callable[[], Any] | None = None) -> FastAPI:
    """The application around any object with the Predictor interface (tests, custom runtimes). Heat-maps use
    ``explain_model_loader()`` or, failing that, a copy of ``predictor.model`` when it has one."""
    identity = ModelIdentity(name=name, version=version, runtime=runtime, run=name)
    loader = explain_model_loader or torch_copy_loader(predictor)
    return create_app_from_service(InferenceService(predictor, config, identity=identity,
                                                    explain_model_loader=loader))
