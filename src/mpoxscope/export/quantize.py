"""int8 ONNX: static quantisation with ONNX Runtime (QDQ format, per-channel weights), calibrated on the run's
own training images, and checked for top-1 agreement with the fp32 PyTorch model before it is written.

Why static QDQ: activations get fixed scales from calibration, so ONNX Runtime runs the convolutions as
integer kernels (VNNI ``vpdpbusd`` on CPUs that have it: 4x the multiply-accumulates of fp32 per cycle) with no
run-time range computation. Per-channel weight scales keep depthwise convolutions, whose channels differ by
orders of magnitude, accurate. Only the backbone's convolutions (and, optionally, the head's matrix products)
are quantised: the attention head is a sliver of the compute and its softmax is sensitive to rounding.

Measured on the fold-1 default (EfficientNet-Lite0 + AGFN, 441 training images calibration did not use): int8
moves the logits by 0.052 rms (fp32 ONNX: 0.001), mostly through activation rounding spread over every block:
with every activation float (int8 weights, bias-corrected) it is 0.023, and making any single activation float
brings it at best to 0.040. So no small set of float layers reaches 99.5 % agreement with fp32. The int8 file
therefore comes with an fp32 fallback for near ties by default (:mod:`mpoxscope.export.fallback`), paid for by
folding the graph's run-time "same" padding into the convolutions (:mod:`mpoxscope.export.graph`: 30 % less
int8 time).
"""

from __future__ import annotations

import json
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
from mpoxscope.engine import rundir
from mpoxscope.engine.checkpoint import load_inference_model, read_meta
from mpoxscope.engine.predict import Predictor
from mpoxscope.errors import ImageError, MpoxscopeError
from mpoxscope.fileio import atomic_path

log = logging.getLogger(__name__)

INT8_FILE = rundir.INT8  # the run directory's file names live in engine/rundir.py
QUANT_KEY = "mpoxscope.quantization"
#: Operator types quantised by default. Clip/Relu must be listed with Conv: the quantiser then folds each
#: activation into its convolution's output range (ReLU6's [0, 6]) instead of quantising the raw convolution
#: output over its much wider pre-activation range (measured: with Conv alone, the stem's output got a scale of
#: 2.1, i.e. three levels for [0, 6], and top-1 agreement with fp32 fell to 44 %). MatMul/Gemm (the AGFN head)
#: stay float: a few % of the FLOPs.
DEFAULT_OPS = ("Conv", "Clip", "Relu")
#: Convolutions kept float at the start of the network (stem + first block of EfficientNet-Lite0: 3). Measured
#: on fold 1 of MSLD v2.0 (all 755 images): keeping the last stages float left agreement at 97 %, keeping
#: these first ones float raised it most, for a few % of the int8 time (they are small-channel layers).
FLOAT_FIRST = 3


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
    settings: str = ""
    fallback_margin: float = 0.0
    fallback_share: float = 0.0  # share of the check images the fp32 fallback recomputed


    def summary(self) -> str:
        return (f"int8 (static QDQ, per-channel, ops {', '.join(self.op_types)}{self.settings}) written to "
                f"{self.onnx_file} "
                f"({self.file_bytes / 1e6:.1f} MB) in {self.seconds:.0f} s; calibrated on "
                f"{self.calibration_count} {self.calibration_source}\n"
                f"top-1 agreement with fp32 PyTorch on {self.check_count} {self.check_source}: "
                f"{100 * self.agreement:.2f} % (required {100 * self.min_agreement:.1f} %); max |prob diff| "
                f"{self.max_abs_prob_diff:.3f}"
                + (f"\nfp32 fallback for top-2 logit gaps below {self.fallback_margin:.3f}: "
                   f"{100 * self.fallback_share:.1f} % of the check images recomputed in fp32"
                   if self.fallback_margin > 0 else ""))


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


def first_layers(model: onnx.ModelProto, n: int) -> list[str]:
    """Names of the first ``n`` Conv nodes in graph order and of the activations (Clip/Relu) right after them:
    the layers kept in float by ``float_first``."""
    convs = [node for node in model.graph.node if node.op_type == "Conv"][:max(0, n)]
    outputs = {o for node in convs for o in node.output}
    acts = [node.name for node in model.graph.node
            if node.op_type in ("Clip", "Relu") and node.input and node.input[0] in outputs]
    return [node.name for node in convs] + acts


def _int8_weights(w: np.ndarray) -> np.ndarray:
    """``w`` after per-output-channel symmetric int8 rounding, as ONNX Runtime's quantiser does it."""
    flat = np.abs(w.reshape(len(w), -1)).max(1)
    scale = np.where(flat > 0, flat / 127.0, 1.0).reshape(-1, *[1] * (w.ndim - 1)).astype(np.float32)
    return np.clip(np.round(w / scale), -127, 127) * scale


def _conv_input_means(model: onnx.ModelProto, names: list[str], batches: list[np.ndarray],
                      input_name: str) -> dict[str, np.ndarray]:
    """Per-channel means of the tensors ``names`` over the calibration batches (float model)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for name in names:
        probe.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    sums: dict[str, np.ndarray] = {}
    count = 0
    for batch in batches:
        for name, value in zip(names, session.run(names, {input_name: batch})):
            sums[name] = sums.get(name, 0) + value.reshape(*value.shape[:2], -1).mean(2).sum(0)
        count += len(batch)
    return {k: v / count for k, v in sums.items()}


def bias_correct(model: onnx.ModelProto, batches: list[np.ndarray], input_name: str,
                 skip: set[str]) -> int:
    """Fold the mean error of int8 weight rounding into each quantised convolution's bias (empirical bias
    correction, Nagel et al. 2019): bias -= (W_int8 - W) . E[input channel]. Why: after BatchNorm folding,
    some depthwise kernels are large and nearly cancel, so rounding them shifts their output by a constant
    (measured: +0.6 on a channel of mean 3.1 in the first block), and ReLU inputs, which are never negative,
    turn such rounding into a bias rather than noise. Returns the number of biases changed."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv" and n.name not in skip and len(n.input) == 3
             and n.input[1] in inits and n.input[2] in inits]
    means = _conv_input_means(model, list(dict.fromkeys(n.input[0] for n in convs)), batches, input_name)
    for node in convs:
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        bias = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32)
        dw, mean = _int8_weights(w) - w, means[node.input[0]]
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if group > 1 and w.shape[1] == 1:  # depthwise: one input channel per output channel
            shift = dw.sum(axis=(1, 2, 3)) * mean
        else:
            shift = (dw.sum(axis=(2, 3)) * mean[None, :]).sum(1)
        inits[node.input[2]].CopyFrom(numpy_helper.from_array((bias - shift).astype(np.float32), node.input[2]))
    return len(convs)


def margin_images(run_dir: str | os.PathLike, exclude: set[str], n: int = 192) -> list[Image.Image]:
    """Up to ``n`` training images of the run's data that calibration did not use (to choose the fallback
    margin: training images judge nothing), else generated ones."""
    files, _ = run_images(run_dir, "train", 10 ** 6)
    files = [f for f in files if str(f) not in exclude]
    if files:
        files = [files[int(i)] for i in np.unique(np.linspace(0, len(files) - 1, min(n, len(files))).astype(int))]
        images = _load_images(files)
        if images:
            return images
    return synthetic_images(min(n, 48), int(read_meta(run_dir).get("image_size", 224)), seed=2)


def _write_fp32_companion(proto: onnx.ModelProto, path: Path, source: Path, meta: dict | None) -> None:
    """The (pad-folded) fp32 graph as the fallback file, with the fp32 export's metadata."""
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))
        _copy_metadata(source, tmp, "fp32 fallback of the int8 file for near-tie photos", meta)


def _set_fallback(path: Path, margin: float, companion: Path) -> None:
    from mpoxscope.export.fallback import FALLBACK_KEY

    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = FALLBACK_KEY, json.dumps({"margin": margin, "file": companion.name})
    onnx.save(proto, str(path))


def _logits_of(path: Path, meta: dict, images: list[Image.Image]) -> np.ndarray:
    from mpoxscope.export.onnx import OnnxPredictor, make_session

    p = OnnxPredictor(make_session(path), meta, path)
    return np.concatenate([p.logits(p.preprocess(images[i:i + 16])).numpy() for i in range(0, len(images), 16)])


def quantize_int8(run_dir: str | os.PathLike, fp32_file: str | os.PathLike | None = None,
                  out_file: str | os.PathLike | None = None, calibration: list[str | os.PathLike] | None = None,
                  calibration_count: int = 96, check: list[str | os.PathLike] | None = None,
                  min_agreement: float = 0.99, op_types: tuple[str, ...] = DEFAULT_OPS,
                  which: str = "best", method: str = "minmax", float_first: int = FLOAT_FIRST,
                  bias_correction: bool = True, pixel_input: bool = False,
                  fallback: str | float = "auto") -> QuantReport:
    """Write the int8 model of run ``run_dir`` to ``out_file`` (default ``RUN/model.int8.onnx``) from its fp32
    ONNX file (``fp32_file``, default ``RUN/model.onnx``, exported first when missing or stale).

    Calibrates on ``calibration`` (files/folders) or ``calibration_count`` training images of the run's data,
    then compares top-1 classes with fp32 PyTorch on ``check`` or the run's validation images; below
    ``min_agreement`` nothing is written and MpoxscopeError says by how much it missed. ``method``: activation
    ranges from "minmax" (every value kept) or "percentile" (99.999th percentile: outliers clipped, finer steps
    for the rest). ``float_first``: the first convolutions (stem and first block) stay float: the image's
    full-resolution layers, where int8 error hurt agreement most (see :data:`FLOAT_FIRST`).
    ``bias_correction``: see :func:`bias_correct`. ``pixel_input``: the file takes raw uint8 pixels
    (:func:`mpoxscope.export.lite.with_pixel_input`). ``fallback``: "auto" (default) writes the fp32 graph
    beside the int8 file (``<out stem>.fallback.onnx``) and records a top-2 logit margin below which a photo is
    recomputed in fp32 (:mod:`mpoxscope.export.fallback`; the margin is chosen on training images calibration
    did not use); a number sets the margin; 0 or "off" writes plain int8. Static "same" padding is folded into
    the convolutions first (:mod:`mpoxscope.export.graph`).
    """
    from mpoxscope.engine.rundir import weights_sha256 as run_weights_sha256
    from mpoxscope.export.onnx import ONNX_FILE, SHA_KEY, OnnxPredictor, make_session

    start = time.perf_counter()
    run_dir = Path(run_dir)
    out = Path(out_file) if out_file is not None else run_dir / INT8_FILE
    if out.is_dir():
        raise MpoxscopeError(f"{out}: is a folder; give a file name such as {out / INT8_FILE}")
    methods = ("minmax", "percentile")
    if method not in methods:
        raise MpoxscopeError(f"--calibration-method: choose {' or '.join(methods)}, not {method!r}")
    margin = check_quantize_options(out, min_agreement, fallback)
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
    companion = companion_path(out)
    companion_existed = companion.exists()
    pixel_meta = meta if pixel_input else None
    try:
        with tempfile.TemporaryDirectory(prefix="mpoxscope-quant-") as tmp:
            prepared, float_graph, excluded = _prepare(fp32_path, Path(tmp), int(fp32.image_size), batches,
                                                       fp32.session.get_inputs()[0].name, float_first,
                                                       bias_correction)
            with atomic_path(out) as target:
                _quantize(prepared, target, fp32.session.get_inputs()[0].name, batches, excluded,
                          op_types, method)
                note = (f"static QDQ int8, per-channel, {method} ranges, ops {','.join(op_types)}, first "
                        f"{float_first} convolutions float, bias correction {'on' if bias_correction else 'off'}"
                        f", static pads folded, {'uint8 pixel' if pixel_input else 'normalised float'} input, "
                        f"calibrated on {len(calib)} {calib_source}")
                _copy_metadata(fp32_path, target, note, pixel_meta)
                if margin != 0.0:
                    _write_fp32_companion(float_graph, companion, fp32_path, pixel_meta)
                    if margin is None:  # auto: from training images calibration did not use
                        images = margin_images(run_dir, {str(f) for f in run_images(run_dir, "train",
                                                                                     calibration_count)[0]})
                        margin = _auto_margin(target, companion, meta, images)
                    _set_fallback(target, margin, companion)
                candidate = OnnxPredictor(make_session(target), meta, target)
                agree, prob_diff = agreement(expected, candidate.predict_images(checks))
                share = _share(candidate.session)
                if not agree >= min_agreement:
                    raise MpoxscopeError(
                        f"{out}: int8 top-1 agreement with fp32 PyTorch is {100 * agree:.2f} % on "
                        f"{len(checks)} {check_source}, {100 * (min_agreement - agree):.2f} points below "
                        f"the required {100 * min_agreement:.1f} %; not written")
                size = target.stat().st_size
    except OSError as e:
        raise MpoxscopeError(f"{out}: cannot write the int8 file ({e.strerror or e})") from None
    except MpoxscopeError:
        if margin != 0.0 and companion.is_file() and not companion_existed:  # only the file this call wrote
            companion.unlink()
        raise
    sha = run_weights_sha256(run_dir, which)
    if _metadata(out).get(SHA_KEY) != sha:  # the predictor's staleness check relies on it
        raise MpoxscopeError(f"{out}: made from {fp32_path}, which was exported from other weights; re-export")
    return QuantReport(onnx_file=out, file_bytes=size, calibration_source=calib_source,
                       calibration_count=len(calib), check_source=check_source, check_count=len(checks),
                       agreement=agree, max_abs_prob_diff=prob_diff, min_agreement=min_agreement,
                       op_types=tuple(op_types), seconds=time.perf_counter() - start,
                       settings=f"; first {float_first} convolutions float; bias correction "
                                f"{'on' if bias_correction else 'off'}; {method} ranges; static pads folded"
                                + ("; uint8 pixel input" if pixel_input else ""),
                       fallback_margin=margin or 0.0, fallback_share=share)


def companion_path(out: Path) -> Path:
    """Where the fp32 fallback graph of the int8 file ``out`` goes: ``<out stem>.fallback.onnx`` beside it."""
    return out.with_name(f"{out.name[:-5] if out.name.endswith('.onnx') else out.name}.fallback.onnx")


def check_quantize_options(out: str | Path | None, min_agreement: float, fallback: str | float) -> float | None:
    """Refuse bad --min-agreement / --fallback-margin values and a fallback file name that holds someone else's
    file, before any export work; returns the margin (None: auto, 0.0: no fallback)."""
    from mpoxscope.export.onnx import is_mpoxscope_onnx
    from mpoxscope.fileio import check_output_file

    if not 0.0 <= min_agreement <= 1.0:
        raise MpoxscopeError(f"--min-agreement: must be in [0, 1], got {min_agreement}")
    margin = _fallback_setting(fallback)
    if out is not None and margin != 0.0:
        check_output_file(companion_path(Path(out)), (".onnx",), ours=is_mpoxscope_onnx)
    return margin


def _fallback_setting(fallback: str | float) -> float | None:
    """None for "auto", else the margin (0.0: no fallback)."""
    if isinstance(fallback, str):
        if fallback.lower() == "auto":
            return None
        if fallback.lower() == "off":
            return 0.0
        try:
            fallback = float(fallback)
        except ValueError:
            raise MpoxscopeError(f"--fallback-margin: 'auto', 'off' or a number >= 0, not {fallback!r}") from None
    if not fallback >= 0.0:
        raise MpoxscopeError(f"--fallback-margin: must be at least 0, got {fallback}")
    return float(fallback)


def _prepare(fp32_path: Path, tmp: Path, image_size: int, batches: list[np.ndarray], input_name: str,
             float_first: int, bias_correction: bool) -> tuple[Path, onnx.ModelProto, list[str]]:
    """(graph to quantise, float graph for the fallback, nodes kept float): shape inference and clean-up as
    ONNX Runtime recommends before quantising, static pads folded, then bias correction."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from mpoxscope.export.graph import fold_static_pads

    prepared = tmp / "prepared.onnx"
    quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
    proto = onnx.load(str(prepared))
    fold_static_pads(proto, image_size)
    plain = onnx.ModelProto()
    plain.CopyFrom(proto)
    excluded = first_layers(proto, float_first)
    if bias_correction:
        bias_correct(proto, batches, input_name, set(excluded))
    onnx.save(proto, str(prepared))
    return prepared, plain, excluded


def _quantize(prepared: Path, target: Path, input_name: str, batches: list[np.ndarray], excluded: list[str],
              op_types: tuple[str, ...], method: str) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}
    quantize_static(
        str(prepared), str(target), _Reader(input_name, batches), nodes_to_exclude=excluded,
        quant_format=QuantFormat.QDQ, per_channel=True, op_types_to_quantize=list(op_types),
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=methods[method],
        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True, "CalibPercentile": 99.999},
    )


def _auto_margin(target: Path, companion: Path, meta: dict, images: list[Image.Image]) -> float:
    from mpoxscope.export.fallback import choose_margin

    return choose_margin(_logits_of(target, meta, images), _logits_of(companion, meta, images))


def _share(session: object) -> float:
    rows = getattr(session, "rows", 0)
    return getattr(session, "recomputed", 0) / rows if rows else 0.0


def _metadata(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def _copy_metadata(source: Path, target: Path, note: str, pixel_meta: dict | None = None) -> None:
    """The fp32 file's mpoxscope metadata (model.json, weights digest) on the int8 file, plus how it was
    quantised: the quantiser drops metadata_props. ``pixel_meta``: also make the input raw pixels, normalised
    as that model.json says."""
    props = _metadata(source)
    props[QUANT_KEY] = note
    proto = onnx.load(str(target))
    if pixel_meta is not None:
        from mpoxscope.export.lite import with_pixel_input

        norm = pixel_meta.get("normalization") or {}
        with_pixel_input(proto, tuple(norm.get("mean", (0.485, 0.456, 0.406))),
                         tuple(norm.get("std", (0.229, 0.224, 0.225))))
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "mpoxscope"
    onnx.save(proto, str(target))
