"""The FastAPI application: a JSON API around :class:`InferenceService` and a single offline web page.

Inference runs in worker threads behind a capacity limiter of ``max_concurrency``: the event loop stays free
to accept uploads, and surplus requests wait their turn instead of failing.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import anyio
from fastapi import FastAPI, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from mpoxscope import __version__
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
from mpoxscope.serve.upload import UploadError, read_upload

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
    queued: float = Field(description="Waiting for a free inference slot")
    decode: float
    inference: float
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
    413: {"model": ErrorBody, "description": "Upload over the byte limit or image over the pixel limit"},
    415: {"model": ErrorBody, "description": "Not multipart/form-data, or not a supported image"},
    422: {"model": ErrorBody, "description": "A recognised image format that cannot be decoded (truncated)"},
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


def create_app_from_service(service: InferenceService) -> FastAPI:
    """The application around an already loaded service."""
    config = service.config

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.limiter = anyio.CapacityLimiter(config.max_concurrency)
        # Import the explanation stack (grad-cam, matplotlib: seconds) now, not on the event loop at the
        # first ?explain= request.
        await anyio.to_thread.run_sync(explain_module)
        yield

    app = FastAPI(
        title="mpoxscope",
        version=__version__,
        summary="Mpox vs. look-alike skin diseases from a photo (AGFN). " + DISCLAIMER,
        description=INTENDED_USE,
        lifespan=lifespan,
    )
    app.state.service = service

    @app.exception_handler(UploadError)
    async def upload_error(request: Request, exc: UploadError) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=exc.status)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not the client's fault: JSON like every other answer, details in the server log only.
        log.exception("internal error on %s", request.url.path)
        return JSONResponse({"detail": f"internal server error ({type(exc).__name__})"}, status_code=500)

    @app.middleware("http")
    async def headers(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        path = request.url.path
        if path == "/" or path.startswith("/static/"):
            response.headers["Content-Security-Policy"] = PAGE_CSP
        if path.startswith("/api/predict"):
            response.headers["Cache-Control"] = "no-store"  # results about someone's skin stay out of caches
        return response

    def limiter() -> anyio.CapacityLimiter:
        # TestClient used without "with" skips the lifespan; one limiter per app all the same.
        if not hasattr(app.state, "limiter"):
            app.state.limiter = anyio.CapacityLimiter(config.max_concurrency)
        return app.state.limiter

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8")

    @app.get("/api/health", response_model=HealthBody, summary="Liveness: the model is loaded")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": dataclasses.asdict(service.identity), "version": __version__}

    @app.get("/api/model", summary="Classes, backbone, validation metrics, calibration, intended use")
    async def model() -> dict[str, Any]:
        return service.model_info()

    @app.get("/api/explain-methods", response_model=ExplainMethodsBody,
             summary="Heat-map methods accepted by /api/predict?explain=")
    async def explain_methods() -> dict[str, Any]:
        methods = service.explain_methods()
        reason = service.explain_unavailable_reason()
        return {"methods": methods, "available": bool(methods), "reason": reason}

    @app.post("/api/predict", response_model=PredictBody, responses=ERROR_RESPONSES,
              openapi_extra=UPLOAD_BODY,
              summary="Classify one photo (multipart field 'file'); ?explain=gradcam adds a heat-map")
    async def predict(request: Request, explain: str | None = Query(
            None, description="Heat-map method, e.g. gradcam (see /api/explain-methods); empty for none",
            max_length=40)) -> dict[str, Any]:
        method = service.check_method(explain) if explain else None  # refuse before reading the upload
        head = request.headers
        upload = await read_upload(request.stream(), head.get("content-type"), head.get("content-length"),
                                   UPLOAD_FIELD, config.max_upload_bytes)
        name = _safe_name(upload.filename)
        submitted = time.perf_counter()

        def work() -> dict[str, Any]:
            queued_ms = (time.perf_counter() - submitted) * 1000.0
            return service.run(upload.data, name, method, queued_ms=queued_ms)

        return await anyio.to_thread.run_sync(work, limiter=limiter())

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def create_app(run_dir: str | os.PathLike, runtime: str = "torch", device: str = "auto",
               max_concurrency: int = 2, max_upload_bytes: int = 20_000_000) -> FastAPI:
    """Load the run in ``run_dir`` with ``runtime`` ("torch" or "onnx") and build the application."""
    config = ServeConfig(max_concurrency=max_concurrency, max_upload_bytes=max_upload_bytes)
    return create_app_from_service(load_service(run_dir, runtime=runtime, device=device, config=config))


def create_app_from_predictor(predictor: PredictorLike, config: ServeConfig | None = None, *,
                              name: str = "model", version: str = "unknown", runtime: str = "torch",
                              explain_model_loader: Callable[[], Any] | None = None) -> FastAPI:
    """The application around any object with the Predictor interface (tests, custom runtimes). Heat-maps use
    ``explain_model_loader()`` or, failing that, a copy of ``predictor.model`` when it has one."""
    identity = ModelIdentity(name=name, version=version, runtime=runtime, run=name)
    loader = explain_model_loader or torch_copy_loader(predictor)
    return create_app_from_service(InferenceService(predictor, config, identity=identity,
                                                    explain_model_loader=loader))
