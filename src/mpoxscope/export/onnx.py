"""ONNX export of a trained run, checked against PyTorch on real images, and an ONNX Runtime predictor.

The graph maps ``image`` (N, 3, S, S) float32, normalised as the run's ``eval_transform`` does, to
``logits`` (N, K). Temperature scaling is *not* in the graph: :class:`OnnxPredictor` applies
``softmax(logits / T)`` with T from the run's ``model.json``, exactly as
:class:`~mpoxscope.engine.predict.Predictor` does, so re-calibrating a run never requires a new export. The
file also embeds ``model.json`` (metadata key ``mpoxscope.meta``) and the SHA-256 of the weights it was made
from, so it can be used on its own (:meth:`OnnxPredictor.from_file`) and a stale export is detected
(:meth:`OnnxPredictor.from_run`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from PIL import Image

from mpoxscope.data.images import load_image
from mpoxscope.data.samples import msld_root
from mpoxscope.engine import rundir
from mpoxscope.engine.checkpoint import load_inference_model, read_meta
from mpoxscope.engine.predict import Predictor, expand_inputs
from mpoxscope.engine.rundir import weights_sha256 as run_weights_sha256
from mpoxscope.errors import MpoxscopeError
from mpoxscope.export.fallback import SHA_KEY  # defined torch-free there, for the lite runtime
from mpoxscope.fileio import atomic_path

log = logging.getLogger(__name__)

ONNX_FILE = rundir.ONNX  # the run directory's file names live in engine/rundir.py
INPUT, OUTPUT = "image", "logits"
META_KEY, WEIGHTS_KEY = "mpoxscope.meta", "mpoxscope.weights"
#: The TorchScript-based exporter handles opset 17; the dynamo exporter (onnxscript) needs 18 or later.
DEFAULT_OPSET, DYNAMO_MIN_OPSET = 17, 18
EXPORTERS = ("auto", "classic", "dynamo")


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_onnx` did and how closely ONNX Runtime matched PyTorch.

    Differences are maxima over all parity images and classes: probabilities after the run's temperature, and
    raw logits. ``batch1_prob_diff`` compares the first image run alone (checks the dynamic batch axis).
    """

    onnx_file: Path
    exporter: str
    opset: int
    dynamic_batch: bool
    weights: str
    file_bytes: int
    parity_source: str
    parity_count: int
    max_abs_prob_diff: float
    max_abs_logit_diff: float
    batch1_prob_diff: float
    tolerance: float
    seconds: float

    def summary(self) -> str:
        batch = "dynamic batch" if self.dynamic_batch else "fixed batch 1"
        return (f"exported {self.onnx_file} ({self.file_bytes / 1e6:.1f} MB, {self.exporter} exporter, opset "
                f"{self.opset}, {batch}, {self.weights} weights) in {self.seconds:.1f} s; onnx.checker: ok\n"
                f"parity with PyTorch on {self.parity_count} {self.parity_source}: max |prob diff| "
                f"{self.max_abs_prob_diff:.2e}, max |logit diff| {self.max_abs_logit_diff:.2e}, batch of 1 "
                f"{self.batch1_prob_diff:.2e} (tolerance {self.tolerance:.0e})")


def weights_sha256(path: str | os.PathLike) -> str:
    path = Path(path)
    if not path.is_file():
        raise MpoxscopeError(f"{path}: weights file not found")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def make_session(onnx_file: str | os.PathLike, threads: int | None = None) -> ort.InferenceSession:
    """A CPU ONNX Runtime session with ``threads`` intra-op threads (default: ``torch.get_num_threads()``, so
    one setting, e.g. ``OMP_NUM_THREADS``, governs both runtimes) and no inter-op parallelism (one image batch
    is one chain of operators). An int8 file exported with an fp32 fallback gives a
    :class:`~mpoxscope.export.fallback.FallbackSession` (same interface)."""
    from mpoxscope.export.fallback import open_session

    try:
        return open_session(onnx_file, max(1, int(threads or torch.get_num_threads())))
    except Exception as e:  # missing, truncated or not an ONNX file; a missing fallback companion
        raise MpoxscopeError(f"{onnx_file}: cannot load ONNX model ({type(e).__name__}: {e})") from None


class OnnxPredictor(Predictor):
    """:class:`Predictor` whose logits come from ONNX Runtime; preprocessing, temperature, batching and
    error handling are Predictor's own (only :meth:`logits` differs). ``model`` is ``None``.

    ``from_run`` exports ``model.onnx`` if it is missing:

    >>> p = OnnxPredictor.from_run("runs/fold1")  # doctest: +SKIP
    >>> p.predict_paths(["lesion.jpg"])  # doctest: +SKIP
    """

    def __init__(self, session: ort.InferenceSession, meta: dict, onnx_file: Path | None = None) -> None:
        super().__init__(None, meta, torch.device("cpu"))  # no torch model: logits() runs the ONNX session
        self.session = session
        self.onnx_file = onnx_file
        inp = session.get_inputs()[0]
        outputs = [o.name for o in session.get_outputs()]
        self._input = inp.name
        self._output = OUTPUT if OUTPUT in outputs else outputs[0]
        shape = list(inp.shape)
        #: A raw-pixel graph (``export --pixel-input``): (N, S, S, 3) uint8 in, normalisation inside.
        self.takes_pixels = inp.type == "tensor(uint8)"
        spatial = shape[1:3] if self.takes_pixels else shape[2:]
        if len(shape) != 4 or spatial != [self.image_size, self.image_size]:
            raise MpoxscopeError(f"{onnx_file or 'ONNX model'}: input shape {shape} does not match the run's "
                                 f"image size {self.image_size}; re-export it")

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, onnx_file: str | os.PathLike | None = None,
                 threads: int | None = None, which: str = "best") -> OnnxPredictor:
        """Predictor for a run: ``onnx_file`` or ``RUN/model.onnx``. The default file is (re-)exported when it
        is missing or was made from other weights; an explicit file that does not match raises."""
        run_dir = Path(run_dir)
        meta = read_meta(run_dir)
        expected = run_weights_sha256(run_dir, which)
        path = Path(onnx_file) if onnx_file is not None else run_dir / ONNX_FILE
        if onnx_file is not None and not path.is_file():
            raise MpoxscopeError(f"{path}: ONNX file not found; create it with 'mpoxscope export {run_dir}'")
        session = make_session(path, threads) if path.is_file() else None
        stale = session is not None and _embedded(session, SHA_KEY) not in (None, expected)
        if onnx_file is not None and stale:
            raise MpoxscopeError(f"{path}: exported from other weights than {run_dir}/{which}.safetensors; "
                                 f"re-export with 'mpoxscope export {run_dir} --out {path}'")
        if session is None or stale:
            log.warning("%s %s; exporting it now", path, "is stale" if stale else "not found")
            export_onnx(run_dir, path, which=which)
            session = make_session(path, threads)
        return cls(session, meta, path)

    @classmethod
    def from_file(cls, onnx_file: str | os.PathLike, threads: int | None = None) -> OnnxPredictor:
        """Predictor from an exported file alone, using the ``model.json`` embedded at export time."""
        session = make_session(onnx_file, threads)
        raw = _embedded(session, META_KEY)
        if raw is None:
            raise MpoxscopeError(f"{onnx_file}: no embedded mpoxscope metadata; use OnnxPredictor.from_run")
        return cls(session, json.loads(raw), Path(onnx_file))

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """As Predictor's, except that a raw-pixel graph gets the resized uint8 (N, S, S, 3) pixels."""
        if not self.takes_pixels:
            return super().preprocess(images)
        from mpoxscope.export.lite import resized_pixels

        return torch.from_numpy(resized_pixels(images, self.image_size))

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) normalised batch (raw-pixel graph: (N, S, S, 3) uint8) -> (N, K) float32 logits,
        computed by ONNX Runtime."""
        from mpoxscope.export.lite import run_batched

        dtype = np.uint8 if self.takes_pixels else np.float32
        x = np.ascontiguousarray(batch.detach().cpu().numpy(), dtype=dtype)
        if not len(x):
            return torch.zeros((0, len(self.classes)), dtype=torch.float32)
        return torch.from_numpy(run_batched(self.session, self._input, x, self._output))


def _embedded(session: ort.InferenceSession, key: str) -> str | None:
    return session.get_modelmeta().custom_metadata_map.get(key)


@contextlib.contextmanager
def _mha_slow_path() -> Iterator[None]:
    """Without gradients, nn.MultiheadAttention takes a fused fast path (``_native_multi_head_attention``)
    that the TorchScript exporter cannot translate; the plain path exports to standard ONNX ops."""
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


def _export_graph(model: torch.nn.Module, path: Path, image_size: int, opset: int, dynamic_batch: bool,
                  exporter: str) -> tuple[str, int]:
    """Write the ONNX graph of ``model`` (logits only) to ``path``; returns (exporter used, opset)."""
    # Trace with batch 2 so nothing in the graph can specialise on a batch of 1.
    example = torch.zeros(2 if dynamic_batch else 1, 3, image_size, image_size)
    errors = []
    for name in (("classic", "dynamo") if exporter == "auto" else (exporter,)):
        try:
            with _mha_slow_path(), torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TracerWarnings about Python branches on constant shapes
                if name == "classic":
                    axes = {INPUT: {0: "batch"}, OUTPUT: {0: "batch"}} if dynamic_batch else None
                    torch.onnx.export(model, (example,), str(path), input_names=[INPUT],
                                      output_names=[OUTPUT], dynamic_axes=axes, opset_version=opset,
                                      do_constant_folding=True, dynamo=False)
                    return name, opset
                opset_used = max(opset, DYNAMO_MIN_OPSET)
                shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
                program = torch.onnx.export(model, (example,), input_names=[INPUT], output_names=[OUTPUT],
                                            dynamic_shapes=shapes, opset_version=opset_used, dynamo=True,
                                            verbose=False)
                program.save(str(path))
                return name, opset_used
        except Exception as e:  # exporter bugs surface as many exception types
            errors.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            log.warning("ONNX export with the %s exporter failed: %s", name, errors[-1])
    raise MpoxscopeError(f"{path}: ONNX export failed ({'; '.join(errors)})")


def is_mpoxscope_onnx(path: Path) -> bool:
    """An ONNX file an mpoxscope export wrote (its metadata carries the run's model.json)."""
    proto = onnx.load(str(path), load_external_data=False)
    return any(p.key == META_KEY for p in proto.metadata_props)


def _add_metadata(path: Path, meta: dict[str, Any], which: str, sha: str) -> None:
    proto = onnx.load(str(path))
    props = {META_KEY: json.dumps(meta), WEIGHTS_KEY: which, SHA_KEY: sha}
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "mpoxscope"
    model, size = meta.get("model", {}), meta["image_size"]
    proto.doc_string = (f"{model.get('backbone', '?')} + {model.get('head', '?')}: input '{INPUT}' "
                        f"(N,3,{size},{size}) normalised RGB, output '{OUTPUT}' (N,{len(meta['classes'])}); "
                        f"classes {', '.join(meta['classes'])}; probabilities = softmax(logits / T) with "
                        "T = calibration.temperature from model.json")
    onnx.save(proto, str(path))


def _real_images(root: Path, n: int) -> list[Path]:
    """``n`` images of a dataset folder, round-robin over its classes in file order (empty if unreadable)."""
    from mpoxscope.data.samples import load_samples

    try:
        data = load_samples(root)
    except MpoxscopeError:
        return []
    per_class = [[s.path for s in data.samples if s.label == c] for c in data.classes]
    return [files[i] for i in range(n) for files in per_class if i < len(files)][:n]


def default_parity_images(image_size: int, n: int = 8, data_root: str | os.PathLike | None = None,
                          ) -> tuple[list[Image.Image], str]:
    """``n`` real images: from ``data_root`` (the data location ``model.json`` records) when it exists, else from
    MSLD v2.0 (``msld_root()``), round-robin over the classes; else ``n`` generated synthetic ones. Returns
    (images, description)."""
    for root, what in ((data_root, "images of the run's training data"), (msld_root(), "MSLD v2.0 images")):
        if root is not None and Path(root).is_dir():
            picked = _real_images(Path(root), n)
            if picked:
                return [load_image(p) for p in picked], f"real {what} from {root}"
    from mpoxscope.data.classes import CANONICAL_CLASSES
    from mpoxscope.data.synthetic import draw_lesion_image

    rng = np.random.default_rng(0)
    size = max(image_size, 160)
    images = [draw_lesion_image(CANONICAL_CLASSES[i % len(CANONICAL_CLASSES)], rng, size) for i in range(n)]
    return images, "generated synthetic images (neither the run's data nor MSLD v2.0 found)"


def _parity_images(paths: list[str | os.PathLike] | None, image_size: int,
                   data_root: str | os.PathLike | None = None) -> tuple[list[Image.Image], str]:
    if not paths:
        return default_parity_images(image_size, data_root=data_root)
    files = expand_inputs(paths)
    return [load_image(p) for p in files], "given images"


def _parity(model: torch.nn.Module, meta: dict, onnx_file: Path, images: list[Image.Image],
            ) -> tuple[float, float, float]:
    """(max |prob diff|, max |logit diff|, max |prob diff| for the first image alone), torch vs ORT, on the
    same preprocessed batches so only the models are compared."""
    reference = Predictor(model, meta, torch.device("cpu"))
    candidate = OnnxPredictor(make_session(onnx_file), meta, onnx_file)
    t = reference.temperature
    prob_diff = logit_diff = batch1 = 0.0
    for i in range(0, len(images), 16):
        batch = reference.preprocess(images[i:i + 16])
        ref = reference.logits(batch)  # as Predictor runs it (MultiheadAttention's fast path included)
        got = candidate.logits(batch)
        logit_diff = max(logit_diff, float((ref - got).abs().max()))
        prob_diff = max(prob_diff, float((torch.softmax(ref / t, 1) - torch.softmax(got / t, 1)).abs().max()))
        if i == 0:
            one = candidate.logits(batch[:1])
            batch1 = float((torch.softmax(ref[:1] / t, 1) - torch.softmax(one / t, 1)).abs().max())
    return prob_diff, logit_diff, batch1


def export_onnx(run_dir: str | os.PathLike, out_file: str | os.PathLike | None = None,
                opset: int = DEFAULT_OPSET, dynamic_batch: bool = True,
                parity_images: list[str | os.PathLike] | None = None, which: str = "best",
                exporter: str = "auto", tolerance: float = 1e-4) -> ExportReport:
    """Export run ``run_dir`` (weights ``which``) to ``out_file`` (default ``RUN/model.onnx``).

    The graph is checked with ``onnx.checker`` and compared with PyTorch on ``parity_images`` (files or
    folders; default: 8 real MSLD images if present, else 8 synthetic ones). If any class probability differs
    by more than ``tolerance``, nothing is written and MpoxscopeError is raised. ``exporter``: "classic"
    (TorchScript-based), "dynamo" (torch.export + onnxscript, slower), or "auto" (classic, then dynamo if
    classic fails).
    ``dynamic_batch=False`` fixes the batch to 1 (:class:`OnnxPredictor` then runs images one by one).
    """
    if exporter not in EXPORTERS:
        raise MpoxscopeError(f"exporter: choose one of {', '.join(EXPORTERS)}, not {exporter!r}")
    start = time.perf_counter()
    run_dir = Path(run_dir)
    out = Path(out_file) if out_file is not None else run_dir / ONNX_FILE
    if out.is_dir():
        raise MpoxscopeError(f"{out}: is a folder; give a file name such as {out / ONNX_FILE}")
    model, meta = load_inference_model(run_dir, which=which)  # with its test-time views or ensemble members
    sha = run_weights_sha256(run_dir, which)
    size = int(meta.get("image_size") or model.config.image_size)
    meta = {**meta, "image_size": size}
    images, source = _parity_images(parity_images, size, (meta.get("data") or {}).get("root"))
    try:
        with atomic_path(out) as tmp:  # the file appears only once it has passed every check
            used, opset_used = _export_graph(model, tmp, size, opset, dynamic_batch, exporter)
            _add_metadata(tmp, meta, which, sha)
            try:
                onnx.checker.check_model(str(tmp), full_check=True)
            except Exception as e:
                raise MpoxscopeError(f"{out}: exported graph fails onnx.checker ({e})") from None
            prob_diff, logit_diff, batch1 = _parity(model, meta, tmp, images)
            if not max(prob_diff, batch1) <= tolerance:  # also catches NaN
                raise MpoxscopeError(f"{out}: ONNX Runtime differs from PyTorch by {max(prob_diff, batch1):.2e} "
                                     f"in probability on {len(images)} {source} (tolerance {tolerance:.0e}); "
                                     "not written")
            size_bytes = tmp.stat().st_size
    except OSError as e:  # read-only run folder, disk full
        raise MpoxscopeError(f"{out}: cannot write the ONNX file ({e.strerror or e})") from None
    return ExportReport(onnx_file=out, exporter=used, opset=opset_used, dynamic_batch=dynamic_batch,
                        weights=which, file_bytes=size_bytes, parity_source=source, parity_count=len(images),
                        max_abs_prob_diff=prob_diff, max_abs_logit_diff=logit_diff, batch1_prob_diff=batch1,
                        tolerance=tolerance, seconds=time.perf_counter() - start)
