"""int8 ONNX: static quantisation with ONNX Runtime (QDQ format, per-channel weights), calibrated on the run's
own training images, and checked for top-1 agreement with the fp32 PyTorch model before it is written.

Why static QDQ: activations get fixed scales from calibration, so ONNX Runtime runs the convolutions as
integer kernels (VNNI ``vpdpbusd`` on CPUs that have it: 4x the multiply-accumulates of fp32 per cycle) with no
run-time range computation. Per-channel weight scales keep depthwise convolutions, whose channels differ by
orders of magnitude, accurate. Only the backbone's convolutions (and, optionally, the head's matrix products)
are quantised: the attention head is a sliver of the compute and its softmax is sensitive to rounding.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from PIL import Image

from mpoxscope.data.images import load_image
from mpoxscope.engine.checkpoint import load_inference_model, read_meta
from mpoxscope.engine.predict import Predictor
from mpoxscope.errors import ImageError, MpoxscopeError
from mpoxscope.fileio import atomic_path

log = logging.getLogger(__name__)

INT8_FILE = "model.int8.onnx"
QUANT_KEY = "mpoxscope.quantization"
#: Operator types quantised by default. Clip/Relu must be listed with Conv: the quantiser then folds each
#: activation into its convolution's output range (ReLU6's [0, 6]) instead of quantising the raw convolution
#: output over its much wider pre-activation range (measured: with Conv alone, the stem's output got a scale of
#: 2.1, i.e. three levels for [0, 6], and top-1 agreement with fp32 fell to 44 %). MatMul/Gemm (the AGFN head)
#: stay float: a few % of the FLOPs.
DEFAULT_OPS = ("Conv", "Clip", "Relu")


@dataclass(frozen=True)
class QuantReport:
    """What :func:`quantize_int8` did and how often the int8 model's top class matches fp32 PyTorch."""

    onnx_file: Path
    file_bytes: int
    calibration_source: str
    calibration_count: int
    check_source: str
    check_count: int
    agreement: float
    max_abs_prob_diff: float
    min_agreement: float
    op_types: tuple[str, ...]
    seconds: float

    def summary(self) -> str:
        return (f"int8 (static QDQ, per-channel, ops {', '.join(self.op_types)}) written to {self.onnx_file} "
                f"({self.file_bytes / 1e6:.1f} MB) in {self.seconds:.0f} s; calibrated on "
                f"{self.calibration_count} {self.calibration_source}\n"
                f"top-1 agreement with fp32 PyTorch on {self.check_count} {self.check_source}: "
                f"{100 * self.agreement:.2f} % (required {100 * self.min_agreement:.1f} %); max |prob diff| "
                f"{self.max_abs_prob_diff:.3f}")


def run_images(run_dir: str | os.PathLike, split: str, n: int) -> tuple[list[Path], str]:
    """Up to ``n`` image paths of ``split`` of the data and fold recorded in the run's model.json, spread
    evenly over the split; ([], reason) when that data is not on this machine."""
    meta = read_meta(run_dir)
    recorded = meta.get("data") or {}
    root = recorded.get("root")
    if not root or not Path(root).is_dir():
        return [], f"the run's data folder ({root or 'not recorded'}) is not here"
    from mpoxscope.config import DataConfig
    from mpoxscope.data.splits import select_fold
    from mpoxscope.engine.runner import prepare

    try:
        prepared = prepare(DataConfig(root=str(root), fold=str(recorded.get("fold", "fold1"))),
                           int((meta.get("train") or {}).get("seed", 0)))
        fold = select_fold(prepared.folds, str(recorded.get("fold", "fold1")))
    except MpoxscopeError as e:
        return [], f"the run's data cannot be read ({e})"
    indices = list(fold.indices(split))
    if not indices:
        return [], f"the {split} split is empty"
    picked = [indices[int(i)] for i in np.linspace(0, len(indices) - 1, min(n, len(indices)))]
    return ([prepared.data.samples[i].path for i in dict.fromkeys(picked)],
            f"{split} images of {recorded.get('dataset', Path(root).name)} {fold.name}")


def _load_images(paths: list[Path]) -> list[Image.Image]:
    images = []
    for p in paths:
        try:
            images.append(load_image(p))
        except ImageError as e:
            log.warning("skipping %s: %s", p, e.reason)
    return images


def synthetic_images(n: int, size: int, seed: int = 0) -> list[Image.Image]:
    from mpoxscope.data.classes import CANONICAL_CLASSES
    from mpoxscope.data.synthetic import draw_lesion_image

    rng = np.random.default_rng(seed)
    return [draw_lesion_image(CANONICAL_CLASSES[i % len(CANONICAL_CLASSES)], rng, max(size, 160))
            for i in range(n)]


def calibration_images(run_dir: str | os.PathLike, n: int = 96,
                       paths: list[str | os.PathLike] | None = None) -> tuple[list[Image.Image], str]:
    """(images, description): ``paths`` when given, else ``n`` training images of the run's own data and
    fold (never validation or test: those judge the model), else generated ones."""
    if paths:
        from mpoxscope.engine.predict import expand_inputs

        return _load_images(expand_inputs(paths)), "given images"
    files, source = run_images(run_dir, "train", n)
    images = _load_images(files)
    if images:
        return images, source
    size = int(read_meta(run_dir).get("image_size", 224))
    log.warning("calibrating on generated images: %s", source)
    return synthetic_images(n, size), f"generated synthetic images ({source})"


def check_images(run_dir: str | os.PathLike, n: int = 144,
                 paths: list[str | os.PathLike] | None = None) -> tuple[list[Image.Image], str]:
    """Images to compare int8 with fp32 on: ``paths``, else the run's validation split, else generated."""
    if paths:
        from mpoxscope.engine.predict import expand_inputs

        return _load_images(expand_inputs(paths)), "given images"
    files, source = run_images(run_dir, "validation", n)
    images = _load_images(files)
    if images:
        return images, source
    size = int(read_meta(run_dir).get("image_size", 224))
    return synthetic_images(n, size, seed=1), f"generated synthetic images ({source})"


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol over preprocessed batches."""

    def __init__(self, input_name: str, batches: list[np.ndarray]) -> None:
        self.input_name = input_name
        self._it = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._it, None)
        return None if batch is None else {self.input_name: batch}


def agreement(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float]:
    """(top-1 agreement, max |prob diff|) of (N, K) probabilities ``candidate`` against ``reference``."""
    if len(reference) == 0:
        return 0.0, 0.0
    same = float((reference.argmax(1) == candidate.argmax(1)).mean())
    return same, float(np.abs(reference - candidate).max())


def quantize_int8(run_dir: str | os.PathLike, fp32_file: str | os.PathLike | None = None,
                  out_file: str | os.PathLike | None = None, calibration: list[str | os.PathLike] | None = None,
                  calibration_count: int = 96, check: list[str | os.PathLike] | None = None,
                  min_agreement: float = 0.99, op_types: tuple[str, ...] = DEFAULT_OPS,
                  which: str = "best", method: str = "minmax") -> QuantReport:
    """Write the int8 model of run ``run_dir`` to ``out_file`` (default ``RUN/model.int8.onnx``) from its fp32
    ONNX file (``fp32_file``, default ``RUN/model.onnx``, exported first when missing or stale).

    Calibrates on ``calibration`` (files/folders) or ``calibration_count`` training images of the run's data,
    then compares top-1 classes with fp32 PyTorch on ``check`` or the run's validation images; below
    ``min_agreement`` nothing is written and MpoxscopeError says by how much it missed. ``method``: activation
    ranges from "minmax" (every value kept) or "percentile" (99.999th percentile: outliers clipped, finer steps
    for the rest).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from mpoxscope.engine.rundir import weights_sha256 as run_weights_sha256
    from mpoxscope.export.onnx import ONNX_FILE, SHA_KEY, OnnxPredictor, make_session

    start = time.perf_counter()
    run_dir = Path(run_dir)
    out = Path(out_file) if out_file is not None else run_dir / INT8_FILE
    if out.is_dir():
        raise MpoxscopeError(f"{out}: is a folder; give a file name such as {out / INT8_FILE}")
    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}
    if method not in methods:
        raise MpoxscopeError(f"--calibration-method: choose {' or '.join(methods)}, not {method!r}")
    if not 0.0 <= min_agreement <= 1.0:
        raise MpoxscopeError(f"--min-agreement: must be in [0, 1], got {min_agreement}")
    fp32 = OnnxPredictor.from_run(run_dir, onnx_file=fp32_file, which=which) if fp32_file else \
        OnnxPredictor.from_run(run_dir, which=which)
    fp32_path = Path(fp32.onnx_file or run_dir / ONNX_FILE)
    model, meta = load_inference_model(run_dir, which=which)  # with its test-time views or ensemble members
    reference = Predictor(model, meta, fp32.device)
    calib, calib_source = calibration_images(run_dir, calibration_count, calibration)
    if not calib:
        raise MpoxscopeError("no calibration images could be read")
    batches = [fp32.preprocess(calib[i:i + 16]).numpy() for i in range(0, len(calib), 16)]
    checks, check_source = check_images(run_dir, paths=check)
    expected = reference.predict_images(checks)
    with tempfile.TemporaryDirectory(prefix="mpoxscope-quant-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # Shape inference + graph clean-up first, as ONNX Runtime recommends before quantising.
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        try:
            with atomic_path(out) as target:
                quantize_static(
                    str(prepared), str(target), _Reader(fp32.session.get_inputs()[0].name, batches),
                    quant_format=QuantFormat.QDQ, per_channel=True, op_types_to_quantize=list(op_types),
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=methods[method],
                    extra_options={"ActivationSymmetric": False, "WeightSymmetric": True,
                                   "CalibPercentile": 99.999},
                )
                _copy_metadata(fp32_path, target, f"static QDQ int8, per-channel, {method} ranges, ops "
                               f"{','.join(op_types)}, "
                               f"calibrated on {len(calib)} {calib_source}")
                candidate = OnnxPredictor(make_session(target), meta, target)
                agree, prob_diff = agreement(expected, candidate.predict_images(checks))
                if not agree >= min_agreement:
                    raise MpoxscopeError(
                        f"{out}: int8 top-1 agreement with fp32 PyTorch is {100 * agree:.2f} % on "
                        f"{len(checks)} {check_source}, {100 * (min_agreement - agree):.2f} points below "
                        f"the required {100 * min_agreement:.1f} %; not written")
                size = target.stat().st_size
        except OSError as e:
            raise MpoxscopeError(f"{out}: cannot write the int8 file ({e.strerror or e})") from None
    sha = run_weights_sha256(run_dir, which)
    if _metadata(out).get(SHA_KEY) != sha:  # the predictor's staleness check relies on it
        raise MpoxscopeError(f"{out}: made from {fp32_path}, which was exported from other weights; re-export")
    return QuantReport(onnx_file=out, file_bytes=size, calibration_source=calib_source,
                       calibration_count=len(calib), check_source=check_source, check_count=len(checks),
                       agreement=agree, max_abs_prob_diff=prob_diff, min_agreement=min_agreement,
                       op_types=tuple(op_types), seconds=time.perf_counter() - start)


def _metadata(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def _copy_metadata(source: Path, target: Path, note: str) -> None:
    """The fp32 file's mpoxscope metadata (model.json, weights digest) on the int8 file, plus how it was
    quantised: the quantiser drops metadata_props."""
    props = _metadata(source)
    props[QUANT_KEY] = note
    proto = onnx.load(str(target))
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "mpoxscope"
    onnx.save(proto, str(target))
