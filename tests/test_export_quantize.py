"""int8 export: static QDQ per-channel quantisation, metadata kept, agreement gate, loadable by the runtimes."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from mpoxscope.errors import MpoxscopeError


@pytest.fixture(scope="module")
def quantized(tiny_run, tmp_path_factory, one_thread):
    from mpoxscope.export.quantize import quantize_int8

    run = Path(shutil.copytree(tiny_run, tmp_path_factory.mktemp("q") / "run"))
    report = quantize_int8(run, calibration_count=8, min_agreement=0.0)
    return run, report


def test_int8_file_is_static_qdq_per_channel(quantized):
    from mpoxscope.export.onnx import SHA_KEY
    from mpoxscope.export.quantize import QUANT_KEY

    run, report = quantized
    assert report.onnx_file == run / "model.int8.onnx" and report.onnx_file.is_file()
    assert "generated synthetic" in report.calibration_source and report.calibration_count == 8
    assert 0.0 <= report.agreement <= 1.0 and "agreement" in report.summary()
    model = onnx.load(str(report.onnx_file))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") > 10 and ops.count("DequantizeLinear") > 10
    # Per-channel: the weight DequantizeLinear feeding a Conv carries one scale per output channel.
    inits = {i.name: i for i in model.graph.initializer}
    scales = [inits[n.input[1]] for n in model.graph.node
              if n.op_type == "DequantizeLinear" and n.input[1] in inits and n.input[0] in inits]
    assert scales and max(len(s.dims) and s.dims[0] for s in scales) > 1
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta[QUANT_KEY].startswith("static QDQ int8") and len(meta[SHA_KEY]) == 64
    # Smaller than fp32 (int8 weights)
    assert report.onnx_file.stat().st_size < 0.5 * (run / "model.onnx").stat().st_size


def test_int8_predictor_and_server_load_it(quantized):
    from fastapi.testclient import TestClient

    from mpoxscope.export.onnx import OnnxPredictor
    from mpoxscope.serve import create_app

    run, report = quantized
    p = OnnxPredictor.from_run(run, onnx_file=report.onnx_file)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 120, 3), dtype=np.uint8))
    probs = p.predict_images([img, img])
    assert probs.shape == (2, 6) and np.allclose(probs.sum(1), 1, atol=1e-5)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    with TestClient(create_app(run, runtime="onnx", onnx_file=report.onnx_file)) as c:
        r = c.post("/api/predict", files={"file": ("x.png", buf.getvalue(), "image/png")})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(list(r.json()["probabilities"].values()), probs[0], atol=1e-4)


def test_agreement_gate_writes_nothing(quantized, tmp_path, monkeypatch):
    import mpoxscope.export.quantize as q

    run, _ = quantized
    monkeypatch.setattr(q, "agreement", lambda ref, got: (0.9712, 0.3))
    out = tmp_path / "low.onnx"
    with pytest.raises(MpoxscopeError, match=r"97\.12 %.*2\.38 points below the required 99\.5 %"):
        q.quantize_int8(run, out_file=out, calibration_count=4, min_agreement=0.995)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_agreement_measure():
    from mpoxscope.export.quantize import agreement

    ref = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    got = np.array([[0.8, 0.2], [0.3, 0.7], [0.4, 0.6]])
    same, diff = agreement(ref, got)
    assert same == pytest.approx(2 / 3) and diff == pytest.approx(0.2)


def test_calibration_uses_the_runs_training_split(synthetic_root, tiny_run, tmp_path):
    """A run whose model.json records its data calibrates on that data's training images only."""
    import json

    from mpoxscope.export.quantize import run_images

    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    meta = json.loads((run / "model.json").read_text())
    meta["data"] = {"root": str(synthetic_root), "fold": "fold1", "dataset": "synthetic"}
    (run / "model.json").write_text(json.dumps(meta))
    train, source = run_images(run, "train", 10)
    val, _ = run_images(run, "validation", 1000)
    assert len(train) == 10 and "train images of synthetic fold1" in source
    assert not set(train) & set(val) and all(Path(p).is_file() for p in train)
    meta["data"]["root"] = str(tmp_path / "gone")
    (run / "model.json").write_text(json.dumps(meta))
    assert run_images(run, "train", 10) == ([], f"the run's data folder ({tmp_path / 'gone'}) is not here")


def test_cli_quantize(quantized, tmp_path, capsys):
    from mpoxscope.cli import main

    run, _ = quantized
    out = tmp_path / "cli.int8.onnx"
    code = main(["export", str(run), "--quantize", "int8", "--out", str(out), "--calibration-count", "4",
                 "--min-agreement", "0"])
    text = capsys.readouterr().out
    assert code == 0 and out.is_file() and "int8 (static QDQ" in text and "parity with PyTorch" in text
    assert main(["export", str(run), "--calibration-count", "4", "--check-images", str(tmp_path)]) == 2
    assert "--quantize" in capsys.readouterr().err


def test_lite_predictor_matches_onnx_predictor_without_torch(quantized):
    import subprocess
    import sys

    from fastapi.testclient import TestClient

    from mpoxscope.export.lite import LiteOnnxPredictor
    from mpoxscope.export.onnx import OnnxPredictor
    from mpoxscope.serve import create_app

    run, _ = quantized
    rng = np.random.default_rng(1)
    exact = Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8))  # no resize: same input
    resized = Image.fromarray(rng.integers(0, 255, (150, 220, 3), dtype=np.uint8))
    lite = LiteOnnxPredictor(run / "model.onnx", threads=1)
    full = OnnxPredictor.from_run(run, threads=1)
    np.testing.assert_allclose(lite.predict_images([exact]), full.predict_images([exact]), atol=1e-5)
    np.testing.assert_allclose(lite.predict_images([resized]), full.predict_images([resized]), atol=0.05)
    k = len(lite.classes)  # vector scaling (a run's calibration may be one): applied as by apply_calibration
    vector = LiteOnnxPredictor(run / "model.onnx", threads=1)
    vector.calibration = {"method": "vector", "vector_w": [0.5 + i for i in range(k)], "vector_b": [0.1] * k}
    z = vector.logits(vector.preprocess([exact])) * (0.5 + np.arange(k)) + 0.1
    np.testing.assert_allclose(vector.predict_images([exact]), np.exp(z) / np.exp(z).sum(1, keepdims=True), atol=1e-5)
    code = "import sys, mpoxscope.export.lite; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0  # the torch-free path stays so
    buf = io.BytesIO()
    exact.save(buf, format="PNG")
    with TestClient(create_app(run, runtime="onnx-lite")) as c:
        r = c.post("/api/predict", files={"file": ("x.png", buf.getvalue(), "image/png")})
        assert c.get("/api/health").json()["model"]["runtime"] == "onnx-lite"
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(list(r.json()["probabilities"].values()), lite.predict_images([exact])[0],
                               atol=1e-5)


def test_pixel_input_graph_matches_the_float_one(quantized, tmp_path):
    """with_pixel_input: uint8 (N,S,S,3) in, the same logits as the normalised float graph; both predictors
    (torch preprocessing and the torch-free one) read such a file."""
    import onnx

    from mpoxscope.export.lite import LiteOnnxPredictor, with_pixel_input
    from mpoxscope.export.onnx import OnnxPredictor, make_session

    run, _ = quantized
    full = OnnxPredictor.from_run(run, threads=1)
    mean, std = tuple(full.meta["normalization"]["mean"]), tuple(full.meta["normalization"]["std"])
    out = tmp_path / "pixels.onnx"
    onnx.save(with_pixel_input(onnx.load(str(run / "model.onnx")), mean, std), str(out))
    size = full.image_size
    img = Image.fromarray(np.random.default_rng(2).integers(0, 255, (size, size, 3), dtype=np.uint8))
    pix = OnnxPredictor(make_session(out, 1), full.meta, out)
    assert pix.takes_pixels and not pix.preprocess([img]).dtype.is_floating_point
    np.testing.assert_allclose(pix.predict_images([img]), full.predict_images([img]), atol=1e-5)
    lite = LiteOnnxPredictor(out, threads=1, meta=full.meta)
    assert lite.takes_pixels and lite.preprocess([img]).shape == (1, size, size, 3)
    np.testing.assert_allclose(lite.predict_images([img, img]), full.predict_images([img, img]), atol=1e-5)


def test_cli_pixel_input_int8(quantized, tmp_path, capsys):
    from mpoxscope.cli import main
    from mpoxscope.export.lite import LiteOnnxPredictor

    run, _ = quantized
    out = tmp_path / "px.int8.onnx"
    assert main(["export", str(run), "--quantize", "int8", "--pixel-input", "--out", str(out),
                 "--calibration-count", "4", "--min-agreement", "0"]) == 0
    capsys.readouterr()
    lite = LiteOnnxPredictor(out, threads=1)
    assert lite.takes_pixels and lite.session.get_inputs()[0].name == "pixels"
    img = Image.fromarray(np.random.default_rng(3).integers(0, 255, (90, 70, 3), dtype=np.uint8))
    assert lite.predict_images([img]).shape == (1, 6)
    fp32 = tmp_path / "px.fp32.onnx"
    assert main(["export", str(run), "--pixel-input", "--out", str(fp32)]) == 0
    assert "uint8 pixel input written" in capsys.readouterr().out
    lite32 = LiteOnnxPredictor(fp32, threads=1)
    full = LiteOnnxPredictor(run / "model.onnx", threads=1)
    assert lite32.takes_pixels
    np.testing.assert_allclose(lite32.predict_images([img]), full.predict_images([img]), atol=0.05)


def test_bias_correction_removes_the_mean_rounding_error():
    """A 1x1 conv on a constant positive input: after correction, int8-rounded weights + corrected bias give
    the float output exactly (the error of rounding is a pure offset there)."""
    from onnx import TensorProto, helper, numpy_helper

    from mpoxscope.export.quantize import _int8_weights, bias_correct, first_layers

    rng = np.random.default_rng(0)
    w = rng.normal(0, 1, (4, 3, 1, 1)).astype(np.float32)
    b = rng.normal(0, 1, 4).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="c0"),
         helper.make_node("Relu", ["y"], ["z"], name="r0")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 2, 2])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert first_layers(model, 1) == ["c0", "r0"] and first_layers(model, 0) == []
    x = np.broadcast_to(np.array([1.0, 2.0, 3.0], np.float32)[None, :, None, None], (2, 3, 2, 2)).copy()
    assert bias_correct(model, [x], "x", skip=set()) == 1
    new_b = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "b"))
    exact = w[:, :, 0, 0] @ np.array([1.0, 2.0, 3.0]) + b
    rounded = _int8_weights(w)[:, :, 0, 0] @ np.array([1.0, 2.0, 3.0]) + new_b
    assert not np.allclose(new_b, b)
    np.testing.assert_allclose(rounded, exact, atol=1e-5)
    assert bias_correct(model, [x], "x", skip={"c0"}) == 0


def test_quantize_only_options_without_quantize_fail_in_one_line(capsys):
    from mpoxscope.cli import main

    for flags in (["--min-agreement", "0.5"], ["--fallback-margin", "off"], ["--float-first", "5"],
                  ["--calibration-method", "percentile"], ["--calibration-count", "10"], ["--no-bias-correction"]):
        assert main(["export", "no-such-run", *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert f"{flags[0]}: needs --quantize int8" in err and len(err.splitlines()) == 1, err
