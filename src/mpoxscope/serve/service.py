"""What the web service does per request, free of HTTP: decode a photo, classify it, decide whether to
abstain, optionally explain it. Everything here is synchronous and runs in a worker thread."""

from __future__ import annotations

import base64
import copy
import dataclasses
import hashlib
import importlib
import io
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import numpy as np
from PIL import Image

from mpoxscope.data.images import MAX_PIXELS
from mpoxscope.engine.screening import Decision, check_screening, decide
from mpoxscope.errors import MpoxscopeError
from mpoxscope.serve.upload import DecodedImage, UploadError, decode_upload

#: Used when the run has no fitted calibration: with six classes a top probability under one half means the
#: model spreads its belief over several diagnoses, so it says "uncertain" rather than naming one.
DEFAULT_ABSTAIN_THRESHOLD = 0.5

INTENDED_USE = (
    "Research and teaching only: a model that studies how well photos can tell Mpox apart from look-alike "
    "rashes (chickenpox, measles, cowpox, hand-foot-and-mouth disease) and healthy skin. It is not a medical "
    "device and must not be used to diagnose, triage or treat anyone. It was trained on a small public data "
    "set (MSLD v2.0) whose photos do not cover every skin tone, body site, camera or disease stage, so it "
    "can be confidently wrong. Anyone worried about a rash should see a clinician."
)

DISCLAIMER = "Research tool, not a diagnosis. See a clinician about any rash or skin lesion."


class PredictorLike(Protocol):
    """What the service needs from a runtime (torch :class:`~mpoxscope.engine.predict.Predictor` or ONNX)."""

    classes: list[str]
    meta: dict
    image_size: int

    def predict_images(self, images: list[Image.Image]) -> np.ndarray: ...


@dataclass(frozen=True)
class ServeConfig:
    """Limits and policy of the service."""

    max_concurrency: int = 1  # forward passes (micro-batches) at once; further requests wait their turn
    max_upload_bytes: int = 20_000_000
    max_batch: int = 16  # photos grouped into one forward pass
    batch_wait_ms: float = 5.0  # how long a batch waits for more photos once it has one
    queue_size: int = 64  # requests held at once (uploading, decoding, waiting, running); more get 503
    max_buffered_bytes: int = 128_000_000  # upload bytes held at once (by Content-Length); more get 503
    body_timeout_s: float = 60.0  # a request body must arrive within this many seconds, else 408
    #: Host header values answered (DNS rebinding); None: no check (library use; the CLI always sets it).
    allowed_hosts: tuple[str, ...] | None = None
    max_pixels: int = MAX_PIXELS
    default_abstain_threshold: float = DEFAULT_ABSTAIN_THRESHOLD
    overlay_max_side: int = 512  # heat-map PNG size: enough for a phone screen, small over the network
    #: Methods not served besides the slow ones (declared slow in the method registry, e.g. Score-CAM).
    excluded_explain_methods: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_concurrency < 1:
            raise MpoxscopeError(f"--max-concurrency: must be at least 1, got {self.max_concurrency}")
        if self.max_upload_bytes < 1:
            raise MpoxscopeError(f"--max-upload-mb: must be positive, got {self.max_upload_bytes} bytes")
        if self.max_batch < 1:
            raise MpoxscopeError(f"--max-batch: must be at least 1, got {self.max_batch}")
        if not 0.0 <= self.batch_wait_ms <= 1000.0:
            raise MpoxscopeError(f"--batch-wait-ms: must be in [0, 1000], got {self.batch_wait_ms}")
        if self.queue_size < 1:
            raise MpoxscopeError(f"--queue-size: must be at least 1, got {self.queue_size}")
        if self.max_buffered_bytes < 1:
            raise MpoxscopeError(f"--max-buffered-mb: must be positive, got {self.max_buffered_bytes} bytes")
        if not self.body_timeout_s > 0:
            raise MpoxscopeError(f"--body-timeout: must be positive, got {self.body_timeout_s}")
        if not 0.0 <= self.default_abstain_threshold <= 1.0:
            raise MpoxscopeError(f"abstain threshold must be in [0, 1], got {self.default_abstain_threshold}")


@dataclass(frozen=True)
class ModelIdentity:
    """How responses name the model: ``version`` is a digest of the weights, so it changes when they do."""

    name: str
    version: str
    runtime: str
    run: str


def weights_digest(path: str | os.PathLike) -> str:
    """First 12 hex digits of the SHA-256 of a file (the model's version), or "unknown" when it is missing."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError:
        return "unknown"
    return h.hexdigest()[:12]


def run_version(run_dir: Path) -> str:
    """First 12 hex digits of the run's weights digest (every member's for an ensemble), or "unknown"."""
    from mpoxscope.engine.rundir import weights_sha256

    try:
        return weights_sha256(run_dir)[:12]
    except (MpoxscopeError, OSError):
        return "unknown"


def abstain_threshold(meta: dict, default: float = DEFAULT_ABSTAIN_THRESHOLD) -> tuple[float, str]:
    """(threshold, source): the calibrated ``meta["calibration"]["abstain_threshold"]`` or the default."""
    value = (meta.get("calibration") or {}).get("abstain_threshold")
    if value is None:
        return float(default), "default"
    try:
        t = float(value)
    except (TypeError, ValueError):
        raise MpoxscopeError(f"model.json: calibration.abstain_threshold is not a number: {value!r}",
                             ) from None
    if not 0.0 <= t <= 1.0:
        raise MpoxscopeError(f"model.json: calibration.abstain_threshold must be in [0, 1], got {t}")
    return t, "calibration"


def explain_module() -> ModuleType | None:
    """``mpoxscope.explain`` when it provides ``explain`` and ``overlay``, else None (imported lazily: it
    pulls in grad-cam and matplotlib)."""
    try:
        module = importlib.import_module("mpoxscope.explain")
    except ModuleNotFoundError as e:
        if e.name and "mpoxscope.explain".startswith(e.name):
            return None
        raise
    return module if hasattr(module, "explain") and hasattr(module, "overlay") else None


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000.0, 2)


class InferenceService:
    """One loaded model and the policy around it. ``explain_model_loader`` returns the torch model used for
    heat-maps (a private copy, since Grad-CAM hooks must not see other requests' forward passes)."""

    def __init__(self, predictor: PredictorLike, config: ServeConfig | None = None, *,
                 identity: ModelIdentity, explain_model_loader: Callable[[], Any] | None = None) -> None:
        self.predictor = predictor
        self.config = config or ServeConfig()
        self.identity = identity
        self.classes = list(predictor.classes)
        self.meta = predictor.meta
        self.threshold, self.threshold_source = abstain_threshold(self.meta,
                                                                  self.config.default_abstain_threshold)
        self.screening = self.meta.get("screening")
        check_screening(self.screening, self.classes)  # a malformed block fails at start-up, not per request
        self._explain_loader = explain_model_loader
        self._explain_model: Any = None
        self._explain_transform: Any = None
        self._explain_lock = threading.Lock()

    # ----- explanations -----------------------------------------------------------------------------------

    def explain_methods(self) -> list[str]:
        """Names accepted by ``?explain=``; empty when explanations are unavailable in this service."""
        module = explain_module()
        if module is None or self._explain_loader is None:
            return []
        # the method registry: slow methods (minutes per image) are not served
        methods = getattr(module, "METHODS", {"gradcam": None})
        names = [str(m) for m in methods if not getattr(methods[m], "slow", False)]
        return [m for m in names if m not in self.config.excluded_explain_methods]

    def explain_unavailable_reason(self) -> str | None:
        if explain_module() is None:
            return "explanations are not available: the mpoxscope.explain module is not installed"
        if self._explain_loader is None:
            return "explanations need the torch model: start the server with --runtime torch"
        return None

    def check_method(self, method: str) -> str:
        """The canonical method name; raises UploadError 400 when it cannot be served."""
        reason = self.explain_unavailable_reason()
        if reason:
            raise UploadError(400, reason)
        module = explain_module()
        methods = self.explain_methods()
        name = method.strip().lower()
        get_method = getattr(module, "get_method", None)
        if get_method is not None:  # accepts spellings like "grad-cam"
            try:
                name = str(get_method(name).name)
            except MpoxscopeError:
                pass
        if name not in methods:
            raise UploadError(400, f"explain: unknown or unavailable method {method!r}; "
                                   f"choose one of {', '.join(methods)}")
        return name

    def _explain_parts(self) -> tuple[Any, Any]:
        if self._explain_model is None:
            from mpoxscope.data.transforms import eval_transform

            norm = self.meta.get("normalization", {})
            self._explain_transform = eval_transform(
                int(self.meta["image_size"]), tuple(norm.get("mean", (0.485, 0.456, 0.406))),
                tuple(norm.get("std", (0.229, 0.224, 0.225))))
            assert self._explain_loader is not None
            self._explain_model = self._explain_loader()
        return self._explain_model, self._explain_transform

    def explain(self, image: Image.Image, method: str, target: int) -> Image.Image:
        """Heat-map overlay (PIL RGB, at most ``overlay_max_side`` px) for class index ``target``."""
        module = explain_module()
        if module is None:
            raise UploadError(400, "explanations are not available: mpoxscope.explain is not installed")
        # The map is computed from the display copy, not the full photo: the model input (S px) is the same
        # to within resampling noise, and a 12 MP phone photo would otherwise cost ~150 ms more to convert.
        side = max(self.config.overlay_max_side, int(self.meta.get("image_size", 0)))
        shown = image.copy()
        shown.thumbnail((side, side), Image.Resampling.LANCZOS)
        with self._explain_lock:  # one model copy, one set of hooks: explanations take turns
            model, transform = self._explain_parts()
            device = next(model.parameters()).device
            batch = transform(shown).unsqueeze(0).to(device)
            try:
                cams = module.explain(model, batch, method=method, target_classes=[target])
            except (MpoxscopeError, ValueError, KeyError) as e:
                raise UploadError(400, f"explain: {e}") from None
        return module.overlay(shown, np.asarray(cams)[0])

    # ----- prediction -------------------------------------------------------------------------------------

    def decode(self, data: bytes, filename: str) -> tuple[DecodedImage, float]:
        """(decoded photo, milliseconds it took); raises UploadError for a bad file."""
        t0 = time.perf_counter()
        decoded = decode_upload(data, filename, self.config.max_pixels)
        return decoded, _ms(t0)

    def predict_batch(self, images: list[Image.Image]) -> np.ndarray:
        """(N, K) probabilities for a micro-batch of decoded photos, in one forward pass."""
        return np.asarray(self.predictor.predict_images(images), dtype=np.float64)

    def run(self, data: bytes, filename: str, method: str | None = None,
            queued_ms: float = 0.0) -> dict[str, Any]:
        """Decode, classify and (with ``method``) explain one uploaded photo: the /api/predict body."""
        t_start = time.perf_counter()
        decoded, decode_ms = self.decode(data, filename)
        t0 = time.perf_counter()
        probs = np.asarray(self.predictor.predict_images([decoded.image]), dtype=np.float64)[0]
        timing = {"queued": round(queued_ms, 2), "decode": decode_ms, "inference": _ms(t0), "batch_size": 1}
        return self.respond(decoded, probs, method, timing, t_start, extra_ms=queued_ms)

    def respond(self, decoded: DecodedImage, probs: np.ndarray, method: str | None, timing: dict[str, Any],
                t_start: float, extra_ms: float = 0.0) -> dict[str, Any]:
        """The /api/predict body for one photo and its probabilities; explains it when ``method`` is set.
        ``timing`` holds queued/decode/inference (ms); total = ``extra_ms`` + time since ``t_start``."""
        k = int(np.argmax(probs))
        top = float(probs[k])
        abstain = not top >= self.threshold  # NaN: abstain
        # The same rule as `mpoxscope predict` and the reports (engine.screening.decide).
        decision = decide(probs, self.classes, self.meta.get("calibration"), self.screening,
                          self.config.default_abstain_threshold)

        explanation = None
        explain_ms = None
        if method:
            t0 = time.perf_counter()
            picture = self.explain(decoded.image, method, k)
            buf = io.BytesIO()
            picture.save(buf, format="PNG", compress_level=3)  # optimize=True: 20x slower, 20 % smaller
            explain_ms = _ms(t0)
            explanation = {
                "method": method, "target_class": self.classes[k],
                "overlay_png_base64": base64.b64encode(buf.getvalue()).decode("ascii"),
                "width": picture.width, "height": picture.height,
            }
        return {
            "top_class": self.classes[k],
            "top_probability": round(top, 6),
            "probabilities": {c: round(float(p), 6) for c, p in zip(self.classes, probs, strict=True)},
            "abstain": abstain,
            "abstain_threshold": self.threshold,
            "threshold_source": self.threshold_source,
            "decision": dataclasses.asdict(decision),
            "screening": self.screening_info(),
            "message": self.message(self.classes[k], top, abstain, decision, probs),
            "disclaimer": DISCLAIMER,
            "model": dataclasses.asdict(self.identity),
            "image": {"format": decoded.format, "width": decoded.size[0], "height": decoded.size[1]},
            "explanation": explanation,
            "timing_ms": {**timing, "explain": explain_ms,
                          "total": round(extra_ms + _ms(t_start), 2)},
        }

    def screening_info(self) -> dict[str, Any] | None:
        """The screening rule in a response: target class, threshold, the sensitivity it was chosen for."""
        if self.screening is None:
            return None
        s = self.screening
        idx, t = check_screening(s, self.classes) or (0, 0.0)
        return {"target_class": self.classes[idx], "threshold": t,
                "target_sensitivity": s.get("target_sensitivity"), "source": public_view(s.get("source"))}

    def message(self, label: str, p: float, abstain: bool, decision: Decision | None = None,
                probs: np.ndarray | None = None) -> str:
        if decision is not None and decision.kind == "refer_target" and probs is not None:
            info = self.screening_info() or {}
            target = str(info.get("target_class"))
            p_t = float(probs[self.classes.index(target)])
            sens = info.get("target_sensitivity")
            chosen = f", chosen on validation for {float(sens):.0%} {target} sensitivity" if sens else ""
            why = (f"its probability ({p_t:.0%}) reaches the screening threshold ({float(info['threshold']):.0%}"
                   f"{chosen})" if p_t >= float(info["threshold"]) else f"it is the model's best guess ({p_t:.0%})")
            return f"Possible {target}: {why}. Please refer to a clinician."
        if decision is not None and decision.kind == "uncertain" and not np.isfinite(p):
            return "Uncertain: the model gave no valid probabilities for this photo. Please refer to a clinician."
        if abstain:
            return (f"Uncertain: the model's best guess ({label}, {p:.0%}) is below its confidence threshold "
                    f"({self.threshold:.0%}). Please refer to a clinician.")
        return f"The model's best guess is {label} ({p:.0%}). This is not a diagnosis; see a clinician."

    def model_info(self) -> dict[str, Any]:
        """The /api/model body: what the model is, how well it did on validation, and what it is for."""
        m = self.meta
        cfg = m.get("model", {})
        return {
            **dataclasses.asdict(self.identity),
            "classes": self.classes,
            "backbone": cfg.get("backbone"),
            "head": cfg.get("head"),
            "image_size": int(m.get("image_size", self.predictor.image_size)),
            "pretrained_source": m.get("pretrained_source"),
            "mpoxscope_version": m.get("mpoxscope_version"),
            "data": public_view(m.get("data")),
            "metrics": public_view(m.get("validation")),
            "calibration": m.get("calibration"),
            "screening": self.screening_info(),
            "abstain_threshold": self.threshold,
            "threshold_source": self.threshold_source,
            "explain_methods": self.explain_methods(),
            "limits": {"max_upload_bytes": self.config.max_upload_bytes, "max_pixels": self.config.max_pixels,
                       "max_concurrency": self.config.max_concurrency, "max_batch": self.config.max_batch,
                       "batch_wait_ms": self.config.batch_wait_ms, "queue_size": self.config.queue_size},
            "intended_use": INTENDED_USE,
            "disclaimer": DISCLAIMER,
        }


#: Keys of model.json sections that hold local paths; left out of public responses.
PATH_KEYS = frozenset({"root", "path", "split_file", "groups_csv", "cache_dir", "data_root"})
_ABS_PATH = re.compile(r"(?:[A-Za-z]:)?[\\/](?:[^\s\\/,;()]+[\\/])+([^\s\\/,;()]+)")


def public_view(value: Any) -> Any:
    """``value`` (a model.json section) without the training machine's file system: path-valued keys are
    dropped and absolute paths inside strings are cut to their last component."""
    if isinstance(value, dict):
        return {k: public_view(v) for k, v in value.items() if k not in PATH_KEYS}
    if isinstance(value, list):
        return [public_view(v) for v in value]
    if isinstance(value, str):
        return _ABS_PATH.sub(lambda m: m.group(1), value)
    return value


def torch_copy_loader(predictor: Any) -> Callable[[], Any] | None:
    """A loader of the single-view network heat-maps hook into (``Predictor.explain_model``): the trained
    network without its test-time views; None for an ensemble (explained member by member)."""
    try:
        model = getattr(predictor, "explain_model", None) or getattr(predictor, "model", None)
    except MpoxscopeError:  # an ensemble
        return None
    if model is None:
        return None

    def load() -> Any:
        return copy.deepcopy(model).eval()

    return load


def load_service(run_dir: str | os.PathLike, runtime: str = "torch", device: str = "auto",
                 config: ServeConfig | None = None,
                 onnx_file: str | os.PathLike | None = None) -> InferenceService:
    """Load a run directory with the chosen runtime (a name in ``mpoxscope.registry.RUNTIMES``; ``onnx_file``:
    an exported file other than RUN/model.onnx, e.g. the int8 one)."""
    run_dir = Path(run_dir)
    from mpoxscope.engine.checkpoint import read_meta

    meta = read_meta(run_dir)  # clear one-line error for a wrong folder before any heavy import
    from mpoxscope.engine.runtimes import RUNTIMES, load_predictor

    spec = RUNTIMES.get(runtime)  # the runtime registry: torch, onnx, onnx-int8, onnx-lite, ...
    predictor: Any = load_predictor(run_dir, spec.name, device, onnx_file)
    if spec.explainable:
        loader = torch_copy_loader(predictor)
    else:
        def loader() -> Any:  # heat-maps need gradients, which only the torch model has
            from mpoxscope.engine.checkpoint import load_model

            return load_model(run_dir, device="cpu")[0]
    cfg = meta.get("model", {})
    identity = ModelIdentity(
        name=str(meta.get("name") or f"{cfg.get('head', 'model')}-{cfg.get('backbone', 'unknown')}"),
        version=run_version(run_dir), runtime=runtime, run=run_dir.resolve().name)
    return InferenceService(predictor, config, identity=identity, explain_model_loader=loader)
