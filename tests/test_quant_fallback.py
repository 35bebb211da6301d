"""int8 export with an fp32 fallback for near ties, and static "same" padding folded into convolutions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from mpoxscope.errors import MpoxscopeError


class _Fixed:
    """A stand-in session: returns preset logits for the rows it is given (rows are identified by feed value)."""

    def __init__(self, table: np.ndarray) -> None:
        self.table, self.calls = table, []

    def run(self, names, feeds):
        rows = feeds["x"].astype(int)
        self.calls.append(rows.tolist())
        return [self.table[rows]]


def test_fallback_recomputes_only_near_ties():
    from mpoxscope.export.fallback import FallbackSession

    fast = np.array([[2.0, 1.9, 0.0], [3.0, 0.0, 0.0], [0.0, 1.0, 1.05], [5.0, 4.0, 0.0]], np.float32)
    exact = fast + np.array([[-0.2, 0.2, 0], [0, 0, 0], [0, 0.3, 0], [0, 0, 0]], np.float32)
    exact_session = _Fixed(exact)
    s = FallbackSession(_Fixed(fast), exact_session, margin=0.5)
    out = s.run(None, {"x": np.arange(4)})[0]
    assert exact_session.calls == [[0, 2]]  # gaps 0.1 and 0.05 are below 0.5; 3.0 and 1.0 are not
    np.testing.assert_array_equal(out[[0, 2]], exact[[0, 2]])
    np.testing.assert_array_equal(out[[1, 3]], fast[[1, 3]])
    assert (s.rows, s.recomputed) == (4, 2)
    s.run(None, {"x": np.array([1, 3])})
    assert exact_session.calls == [[0, 2]]  # no near tie: the fp32 session is not run at all


def test_margin_bounds_every_class_flip_it_was_chosen_on():
    """Above the chosen margin, no int8 photo of the choosing set can disagree with fp32 on its top class."""
    from mpoxscope.export.fallback import choose_margin, top2_gap

    rng = np.random.default_rng(0)
    exact = rng.normal(0, 1.5, (2000, 6)).astype(np.float32)
    fast = exact + rng.normal(0, 0.1, exact.shape).astype(np.float32) * rng.uniform(0, 3, (2000, 1))
    margin = choose_margin(fast, exact, safety=1.0)
    flips = fast.argmax(1) != exact.argmax(1)
    assert flips.any() and margin > 0
    assert not (flips & (top2_gap(fast) >= margin)).any()
    assert choose_margin(fast, exact, safety=2.0) == pytest.approx(2 * margin)
    assert choose_margin(exact, exact) == 0.0


def test_fold_static_pads_keeps_the_outputs(quantized, tmp_path):
    """The tf_ backbone's run-time "same" padding becomes Conv pads: no Pad left, same logits."""
    import onnxruntime as ort

    from mpoxscope.export.graph import fold_static_pads

    run, _ = quantized
    model = onnx.load(str(run / "model.onnx"))
    size = model.graph.input[0].type.tensor_type.shape.dim[2].dim_value
    assert sum(n.op_type == "Pad" for n in model.graph.node) >= 4
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    assert fold_static_pads(folded, size) >= 4
    assert not any(n.op_type in ("Pad", "Ceil") for n in folded.graph.node)
    onnx.checker.check_model(folded)
    x = np.random.default_rng(0).normal(0, 1, (3, 3, size, size)).astype(np.float32)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    a, b = (ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
            .run(None, {"image": x})[0] for m in (model, folded))
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.fixture(scope="module")
def quantized(tiny_run, tmp_path_factory, one_thread):
    from mpoxscope.export.quantize import quantize_int8

    run = Path(shutil.copytree(tiny_run, tmp_path_factory.mktemp("qf") / "run"))
    report = quantize_int8(run, calibration_count=8, min_agreement=0.0, pixel_input=True,
                           out_file=run / "model.int8.pixels.onnx")
    return run, report


def _fallback_spec(path: Path) -> dict:
    from mpoxscope.export.fallback import FALLBACK_KEY

    return json.loads({p.key: p.value for p in onnx.load(str(path)).metadata_props}[FALLBACK_KEY])


def test_export_writes_the_int8_file_and_its_fp32_fallback(quantized):
    from mpoxscope.export.fallback import FallbackSession
    from mpoxscope.export.lite import LiteOnnxPredictor

    run, report = quantized
    spec = _fallback_spec(report.onnx_file)
    companion = run / spec["file"]
    assert companion.name == "model.int8.pixels.fallback.onnx" and companion.is_file()
    assert spec["margin"] == pytest.approx(report.fallback_margin) and report.fallback_margin > 0
    assert "fp32 fallback" in report.summary() and 0.0 <= report.fallback_share <= 1.0
    assert not any(n.op_type == "Pad" for n in onnx.load(str(companion)).graph.node)
    p = LiteOnnxPredictor(report.onnx_file, 1)
    assert isinstance(p.session, FallbackSession) and p.takes_pixels
    assert p.session.get_session_options().intra_op_num_threads == 1  # engine/runtimes.py reads it
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)) for _ in range(5)]
    p.session.margin = np.inf  # every photo recomputed: exactly the fp32 companion's probabilities
    np.testing.assert_allclose(p.predict_images(images), LiteOnnxPredictor(companion, 1).predict_images(images),
                               atol=1e-6)
    assert p.session.recomputed == p.session.rows == 5


def test_missing_fallback_file_is_one_clear_error(quantized, tmp_path):
    from mpoxscope.export.onnx import make_session

    run, report = quantized
    lone = tmp_path / report.onnx_file.name
    shutil.copy(report.onnx_file, lone)
    with pytest.raises(MpoxscopeError, match="fp32 fallback file .* is missing"):
        make_session(lone)


def test_fallback_off_writes_plain_int8(quantized, tmp_path):
    from mpoxscope.export.fallback import FALLBACK_KEY
    from mpoxscope.export.quantize import quantize_int8

    run, _ = quantized
    report = quantize_int8(run, calibration_count=4, min_agreement=0.0, out_file=tmp_path / "plain.onnx",
                           fallback="off")
    assert FALLBACK_KEY not in {p.key for p in onnx.load(str(report.onnx_file)).metadata_props}
    assert report.fallback_margin == 0.0 and [p.name for p in tmp_path.iterdir()] == ["plain.onnx"]
    with pytest.raises(MpoxscopeError, match="--fallback-margin"):
        quantize_int8(run, out_file=tmp_path / "x.onnx", fallback="sometimes")
