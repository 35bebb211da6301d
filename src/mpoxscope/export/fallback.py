"""int8 with an fp32 fallback for near ties: photos whose int8 top-2 logit gap is below a margin are run again
by the fp32 graph, so the top class agrees with fp32 where int8 rounding could flip it.

Why: int8 rounding moves this network's logits by ~0.05 (rms) and by up to a few tenths on some photos, and a
fine-tuned 6-class model has photos near a decision boundary: plain int8 disagreed with fp32 on 10 of the 755
MSLD v2.0 photos (98.7 %), and keeping more layers float cost speed without closing the gap (see
benchmarks/results/inference.md). A photo whose int8 gap exceeds the largest logit error int8 makes cannot
change class, so only the few near ties pay for fp32 (a few % of photos, chosen on training images).

Torch-free: used by both :class:`mpoxscope.export.lite.LiteOnnxPredictor` and the torch predictor.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

#: Metadata key of an int8 file with a fallback: JSON {"margin": logit gap, "file": fp32 file name beside it}.
FALLBACK_KEY = "mpoxscope.fallback"
SHA_KEY = "mpoxscope.weights_sha256"  # defined here, torch-free; mpoxscope.export.onnx imports it


def session_options(threads: int) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, int(threads))
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only: ORT's warnings about unused initialisers are noise here
    return opts


def top2_gap(logits: np.ndarray) -> np.ndarray:
    """(N, K) logits -> (N,) difference between the largest and the second largest."""
    if logits.shape[1] < 2:
        return np.full(len(logits), np.inf, np.float32)
    top = np.partition(logits, -2, axis=1)
    return top[:, -1] - top[:, -2]


class FallbackSession:
    """An ``onnxruntime.InferenceSession`` look-alike (run, get_inputs, get_outputs, get_modelmeta) over an
    int8 session whose near-tie rows are recomputed by an fp32 session with the same input and output."""

    def __init__(self, fast: ort.InferenceSession, exact: ort.InferenceSession, margin: float) -> None:
        self.fast, self.exact, self.margin = fast, exact, float(margin)
        self.rows = self.recomputed = 0  # running counts: how often the fallback ran

    def __getattr__(self, name: str) -> object:
        """Anything else (get_inputs, get_modelmeta, get_session_options...) is the int8 session's."""
        return getattr(self.fast, name)

    def get_outputs(self):  # noqa: ANN201 - onnxruntime's own NodeArg list
        return self.fast.get_outputs()[:1]  # run() returns the logits only

    def run(self, output_names: list[str] | None, feeds: dict[str, np.ndarray], *args: object) -> list[np.ndarray]:
        logits = self.fast.run(None, feeds)[0]
        near = np.flatnonzero(top2_gap(logits) < self.margin)
        self.rows += len(logits)
        if near.size:
            self.recomputed += int(near.size)
            logits = logits.copy()
            logits[near] = self.exact.run(None, {k: v[near] for k, v in feeds.items()})[0]
        return [logits]


def open_session(onnx_file: str | os.PathLike, threads: int) -> ort.InferenceSession | FallbackSession:
    """A CPU session for ``onnx_file``; for an int8 file exported with a fallback, a :class:`FallbackSession`
    over it and its fp32 companion (ValueError if the companion is missing or from other weights)."""
    opts = session_options(threads)
    fast = ort.InferenceSession(str(onnx_file), sess_options=opts, providers=["CPUExecutionProvider"])
    props = fast.get_modelmeta().custom_metadata_map
    if FALLBACK_KEY not in props:
        return fast
    try:
        spec = json.loads(props[FALLBACK_KEY])
        margin, name = float(spec["margin"]), str(spec["file"])
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{onnx_file}: unreadable {FALLBACK_KEY} metadata") from None
    companion = Path(onnx_file).parent / Path(name).name
    if not companion.is_file():
        raise ValueError(f"{onnx_file}: its fp32 fallback file {companion} is missing; re-export with "
                         "'mpoxscope export RUN --quantize int8'")
    exact = ort.InferenceSession(str(companion), sess_options=opts, providers=["CPUExecutionProvider"])
    if exact.get_modelmeta().custom_metadata_map.get(SHA_KEY) != props.get(SHA_KEY):
        raise ValueError(f"{companion}: made from other weights than {onnx_file}; re-export both")
    if [(i.name, i.type) for i in exact.get_inputs()] != [(i.name, i.type) for i in fast.get_inputs()]:
        raise ValueError(f"{companion}: its input differs from {onnx_file}'s; re-export both")
    return FallbackSession(fast, exact, margin)


def choose_margin(int8_logits: np.ndarray, fp32_logits: np.ndarray, safety: float = 1.25) -> float:
    """The fallback margin from images that judge nothing (training images not used for calibration):
    ``safety`` x the largest int8 logit error seen there, where the error of a photo bounds how far its top-2
    gap can move, 2 x max_k |d_k - mean(d)| with d = int8 - fp32 logits. A photo whose int8 gap exceeds it
    keeps its class unless int8 errs more on it than on any of these images."""
    if len(int8_logits) == 0:
        return 0.0
    d = int8_logits - fp32_logits
    error = 2.0 * np.abs(d - d.mean(1, keepdims=True)).max(1)
    return float(safety * error.max())
