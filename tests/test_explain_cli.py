"""``mpoxscope explain`` end to end on the untrained fixture run: folder, file, bad file, faithfulness."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import make_run

from mpoxscope.cli import main
from mpoxscope.explain.gallery import GalleryEntry, sort_entries

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def inputs(synthetic_root, tmp_path_factory):
    """Three images and one file that is not an image."""
    folder = tmp_path_factory.mktemp("explain_in")
    for cls in ("Mpox", "Measles", "Healthy"):
        shutil.copy(sorted((synthetic_root / cls).glob("*.png"))[0], folder / f"{cls.lower()}.png")
    (folder / "broken.jpg").write_bytes(b"this is not a jpeg")
    return folder


def test_folder_gives_outputs_for_good_files_and_an_error_line_for_a_bad_one(tiny_run, inputs, tmp_path,
                                                                             capsys):
    out = tmp_path / "out"
    rc = main(["explain", str(tiny_run), str(inputs), "--out", str(out), "--method", "gradcam,gradcam++",
               "--per-head"])
    captured = capsys.readouterr()
    assert rc == 1  # one input failed, the others were explained
    errors = [line for line in captured.err.splitlines() if line.strip()]
    assert len(errors) == 1 and "broken.jpg" in errors[0] and "Traceback" not in captured.err
    for name in ("mpox", "measles", "healthy"):
        folder = out / name
        for f in ("panel.png", "gradcam.png", "gradcampp.png", "attention.png", "attention_head0.png"):
            assert (folder / f).stat().st_size > 1000, f
        cam = np.load(folder / "gradcam.npy")
        assert cam.shape == (128, 128) and cam.dtype == np.float32 and 0 <= cam.min() and cam.max() <= 1
        grid = np.load(folder / "attention_grid.npy")
        assert grid.shape == (4, 4, 4)  # heads x H x W at 128 px
        np.testing.assert_allclose(grid.sum(axis=(1, 2)), 1.0, atol=1e-5)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["methods"] == ["gradcam", "gradcam++", "attention"]
    entries = summary["images"]
    assert len(entries) == 4 and entries[-1]["error"] and entries[-1]["source"].endswith("broken.jpg")
    ok = entries[:3]
    assert all(abs(sum(e["probabilities"].values()) - 1) < 1e-4 for e in ok)
    assert all(e["target"] == e["label"] for e in ok)  # default: explain the predicted class
    html = (out / "index.html").read_text()
    assert html.count('class="card"') == 3 and "broken.jpg" in html and "Not explained (1)" in html


def test_single_file_with_target_class(tiny_run, inputs, tmp_path, capsys):
    out = tmp_path / "one"
    rc = main(["explain", str(tiny_run), str(inputs / "mpox.png"), "--out", str(out), "--target-class",
               "measles", "--method", "layercam", "--no-attention"])
    assert rc == 0, capsys.readouterr().err
    entry = json.loads((out / "summary.json").read_text())["images"][0]
    assert entry["target"] == "Measles" and set(entry["files"]) == {"layercam", "layercam.npy"}
    assert (out / "mpox" / "panel.png").is_file() and not (out / "mpox" / "attention.png").exists()


def test_faithfulness_table(tiny_run, inputs, tmp_path, capsys):
    out = tmp_path / "faith"
    rc = main(["explain", str(tiny_run), str(inputs / "mpox.png"), str(inputs / "healthy.png"), "--out",
               str(out), "--method", "gradcam", "--no-attention", "--faithfulness",
               "--road-percentiles", "50"])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "faithfulness.json").read_text())
    assert {s["method"] for s in report["scores"]} == {"gradcam", "random"}
    assert report["n_images"] == 2
    md = (out / "faithfulness.md").read_text()
    assert "| gradcam |" in md and "random (reference)" in md and "s / image" in md


def test_user_errors_are_one_line(tiny_run, inputs, tmp_path, capsys):
    linear = make_run(tmp_path / "linear", backbone="resnet18", head="linear", pretrained="none")
    assert main(["explain", str(linear), str(inputs / "mpox.png"), "--out", str(tmp_path / "o"),
                 "--method", "attention"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no attention" in err and len(err.splitlines()) == 1
    assert main(["explain", str(tiny_run), str(inputs / "mpox.png"), "--out", str(tmp_path / "o"),
                 "--target-class", "Psoriasis"]) == 2
    assert "unknown class" in capsys.readouterr().err
    assert main(["explain", str(tiny_run), str(inputs / "mpox.png"), "--out", str(tmp_path / "o"),
                 "--method", "saliency"]) == 2
    assert "unknown method" in capsys.readouterr().err


def test_predictions_identical_after_explaining(tiny_run, inputs):
    from mpoxscope.data.images import load_image
    from mpoxscope.engine.predict import Predictor
    from mpoxscope.explain import explain_images

    predictor = Predictor.from_run(tiny_run, "cpu")
    images = [load_image(p) for p in sorted(inputs.glob("*.png"))]
    before = predictor.predict_images(images)
    results = explain_images(predictor, images, ["gradcam", "eigencam", "attention"], batch_size=2)
    assert np.array_equal(predictor.predict_images(images), before)
    assert [r.label for r in results] == [predictor.classes[k] for k in before.argmax(1)]
    np.testing.assert_allclose([r.confidence for r in results], before.max(1), rtol=1e-5)
    assert all(r.maps["eigencam"].shape == (128, 128) for r in results)


def test_gallery_order_is_by_class_then_confidence():
    entries = [GalleryEntry("a", "Measles", 0.9), GalleryEntry("b", "Mpox", 0.4),
               GalleryEntry("c", error="x"), GalleryEntry("d", "Mpox", 0.8)]
    assert [e.source for e in sort_entries(entries, ["Mpox", "Measles"])] == ["d", "b", "a", "c"]


def test_gallery_flags_a_prediction_that_disagrees_with_the_folder():
    from mpoxscope.explain.gallery import render_gallery

    page = render_gallery([GalleryEntry("images/Mpox/a.jpg", "Measles", 0.7, "Measles", folder_label="Mpox"),
                           GalleryEntry("images/Mpox/b.jpg", "Mpox", 0.9, "Mpox", folder_label="Mpox")], "t")
    assert page.count("folder: Mpox") == 2 and page.count('<span class="err">folder: Mpox') == 1
