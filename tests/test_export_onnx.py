"""ONNX export: checker, parity with PyTorch, dynamic batch, the ONNX Runtime predictor and the CLI."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import make_run
from safetensors.torch import load_file, save_file

from mpoxscope.data.images import load_image
from mpoxscope.engine.predict import Predictor
from mpoxscope.errors import MpoxscopeError
from mpoxscope.export import cli as export_cli
from mpoxscope.export import onnx as export_onnx_module
from mpoxscope.export.onnx import ONNX_FILE, OnnxPredictor, default_parity_images, export_onnx


def _images(root: Path, per_class: int = 1) -> list[Path]:
    return [p for d in sorted(root.iterdir()) if d.is_dir() for p in sorted(d.iterdir())[:per_class]]


@pytest.fixture(scope="module")
def exported(tiny_run, synthetic_root, tmp_path_factory):
    """The tiny AGFN run exported once, checked on generated images (three classes)."""
    out = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    report = export_onnx(tiny_run, out, parity_images=_images(synthetic_root)[:3])
    return out, report


@pytest.fixture(scope="module")
def predictors(tiny_run, exported):
    return Predictor.from_run(tiny_run, device="cpu"), OnnxPredictor.from_run(tiny_run, exported[0])


def test_export_passes_checker_and_parity(exported):
    out, report = exported
    assert out.is_file() and report.onnx_file == out and report.exporter == "classic"
    assert report.parity_count == 3 and report.parity_source == "given images"
    assert report.max_abs_prob_diff < 1e-4 and report.batch1_prob_diff < 1e-4
    assert "parity" in report.summary()
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["image"]
    assert [o.name for o in model.graph.output] == ["logits"]
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # symbolic batch axis
    keys = {p.key for p in model.metadata_props}
    assert {"mpoxscope.meta", "mpoxscope.weights_sha256"} <= keys


@pytest.mark.parametrize("batch", [1, 3])
def test_dynamic_batch_matches_torch(predictors, synthetic_root, batch):
    torch_pred, onnx_pred = predictors
    images = [load_image(p) for p in _images(synthetic_root)[:batch]]
    expected, got = torch_pred.predict_images(images), onnx_pred.predict_images(images)
    assert got.shape == (batch, 6)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)


def test_predict_paths_handles_bad_files_like_predictor(predictors, synthetic_root, tmp_path):
    torch_pred, onnx_pred = predictors
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    good = _images(synthetic_root)[:2]
    paths = [good[0], bad, tmp_path / "missing.png", good[1]]
    ours, theirs = onnx_pred.predict_paths(paths), torch_pred.predict_paths(paths)
    assert [p.error is None for p in ours] == [True, False, False, True]
    assert [p.error for p in ours] == [p.error for p in theirs]
    assert [p.label for p in ours] == [p.label for p in theirs]
    assert ours[0].confidence == pytest.approx(theirs[0].confidence, abs=1e-4)
    assert onnx_pred.classes == torch_pred.classes and onnx_pred.model is None


def test_from_file_uses_embedded_metadata(exported, predictors):
    p = OnnxPredictor.from_file(exported[0])
    assert p.classes == predictors[0].classes and p.image_size == 128


def test_from_run_exports_when_missing_and_when_stale(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setenv("MPOXSCOPE_MSLD", str(tmp_path / "absent"))  # parity on synthetic images
    default = export_onnx_module.default_parity_images
    monkeypatch.setattr(export_onnx_module, "default_parity_images",
                        lambda size, n=8, data_root=None: default(size, 2, data_root))
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    first = OnnxPredictor.from_run(run)
    assert first.onnx_file == run / ONNX_FILE and first.onnx_file.is_file()
    # Retrained weights: the default file is re-exported, an explicit stale file is refused.
    stale_copy = shutil.copy(run / ONNX_FILE, tmp_path / "old.onnx")
    state = load_file(str(run / "best.safetensors"))
    state["head.classifier.bias"] = state["head.classifier.bias"] + 1.0
    save_file(state, str(run / "best.safetensors"))
    image = [load_image(_any_image(tmp_path))]
    again = OnnxPredictor.from_run(run)
    expected = Predictor.from_run(run, "cpu").predict_images(image)
    np.testing.assert_allclose(again.predict_images(image), expected, atol=1e-4)
    with pytest.raises(MpoxscopeError, match="other weights"):
        OnnxPredictor.from_run(run, stale_copy)
    with pytest.raises(MpoxscopeError, match="not found"):
        OnnxPredictor.from_run(run, tmp_path / "nope.onnx")


def _any_image(tmp_path: Path) -> Path:
    from mpoxscope.data.synthetic import draw_lesion_image

    path = tmp_path / "lesion.png"
    draw_lesion_image("Mpox", np.random.default_rng(1), 160).save(path)
    return path


def test_default_parity_images_fall_back_to_synthetic(tmp_path, monkeypatch):
    monkeypatch.setenv("MPOXSCOPE_MSLD", str(tmp_path / "absent"))
    images, source = default_parity_images(128, n=4)
    assert len(images) == 4 and "synthetic" in source


def test_parity_failure_writes_nothing(tiny_run, synthetic_root, tmp_path, monkeypatch):
    monkeypatch.setattr(export_onnx_module, "_parity", lambda *a, **k: (0.5, 1.0, 0.5))
    out = tmp_path / "bad.onnx"
    with pytest.raises(MpoxscopeError, match="differs from PyTorch"):
        export_onnx(tiny_run, out, parity_images=_images(synthetic_root)[:1])
    assert not out.exists() and not list(tmp_path.glob(".bad.onnx*"))


def test_cli_linear_head_static_batch(tmp_path, synthetic_root, capsys):
    run = make_run(tmp_path / "linear", head="linear")
    folder = tmp_path / "parity"
    folder.mkdir()
    for p in _images(synthetic_root)[:2]:
        shutil.copy(p, folder)
    parser = argparse.ArgumentParser()
    export_cli.register(parser.add_subparsers())
    out = tmp_path / "linear.onnx"
    args = parser.parse_args(["export", str(run), "--format", "onnx", "--out", str(out), "--static-batch",
                              "--parity-images", str(folder), str(_images(synthetic_root)[2])])
    assert args.handler(args) == 0
    text = capsys.readouterr().out
    assert "fixed batch 1" in text and "3 given images" in text  # 2 from the folder + 1 file
    images = [load_image(p) for p in _images(synthetic_root)[:3]]
    got = OnnxPredictor.from_run(run, out).predict_images(images)  # batch 3 through a batch-1 graph
    np.testing.assert_allclose(got, Predictor.from_run(run, "cpu").predict_images(images), atol=1e-4)
    from mpoxscope.export.lite import LiteOnnxPredictor  # the torch-free runtime (serve --runtime onnx-lite) too

    np.testing.assert_allclose(LiteOnnxPredictor(out, threads=1).predict_images(images), got, atol=1e-5)
    with pytest.raises(MpoxscopeError, match="not a trained run"):
        args = parser.parse_args(["export", str(tmp_path / "nothing"), "--out", str(out)])
        args.handler(args)


@pytest.mark.realdata
def test_parity_on_real_msld_images(msld, predictors):
    torch_pred, onnx_pred = predictors
    classes = ("Mpox", "Chickenpox", "Measles", "HFMD")
    files = [sorted((msld / "images" / c).glob("*.jpg"))[0] for c in classes]
    images = [load_image(p) for p in files]
    diff = np.abs(onnx_pred.predict_images(images) - torch_pred.predict_images(images)).max()
    print(f"max |prob diff| on 4 MSLD images: {diff:.2e}")
    assert diff < 1e-4


@pytest.mark.slow
def test_dynamo_exporter(tiny_run, synthetic_root, tmp_path):
    torch.manual_seed(0)
    report = export_onnx(tiny_run, tmp_path / "dynamo.onnx", exporter="dynamo",
                         parity_images=_images(synthetic_root)[:2])
    assert report.exporter == "dynamo" and report.opset >= 18 and report.max_abs_prob_diff < 1e-4
