"""Issue 11 (trust): hostile or mangled inputs, output folders that are not ours, bounded decoding."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from mpoxscope.data.images import ALLOWED_FORMATS, DEFAULT_MAX_SIDE, decode_image, load_image
from mpoxscope.errors import ImageError, MpoxscopeError
from mpoxscope.fileio import OUTPUT_MARKER, check_output_dir, check_output_file, clear_output_dir, mark_output_dir

EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\n"
       b"0 0 moveto 8 8 lineto stroke\nshowpage\n%%EOF\n")


# --- item 4: FIFOs and other non-regular files; item 10: empty files ------------------------------------------

@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_fifo_is_refused_without_opening(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    # In a child process with a timeout: opening a FIFO for reading blocks until a writer appears.
    code = ("from mpoxscope.data.images import load_image\n"
            "from mpoxscope.errors import ImageError\n"
            f"try:\n    load_image({str(fifo)!r})\nexcept ImageError as e:\n    print(e.reason)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "not a regular file" in proc.stdout


def test_empty_file_says_empty(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match="empty.jpg: empty file"):
        load_image(empty)


# --- item 5: one decoder policy -------------------------------------------------------------------------------

def test_eps_named_jpg_never_reaches_the_eps_decoder(tmp_path, monkeypatch):
    from PIL import EpsImagePlugin

    called = []
    original = EpsImagePlugin.EpsImageFile._open

    def spy(self):
        called.append(True)
        return original(self)

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", spy)
    fake = tmp_path / "photo.jpg"
    fake.write_bytes(EPS)
    with pytest.raises(ImageError, match="photo.jpg: not a supported image format"):
        load_image(fake)
    with pytest.raises(ImageError, match="not a supported image format"):
        decode_image(EPS, "upload.jpg")
    assert not called


def test_server_and_cli_share_the_allow_list():
    from mpoxscope.serve import upload

    assert upload.ALLOWED_FORMATS is ALLOWED_FORMATS


# --- item 7: decoded images are reduced at once ---------------------------------------------------------------

def test_large_images_are_reduced_while_decoding(tmp_path, monkeypatch):
    big = tmp_path / "big.jpg"
    Image.new("RGB", (4200, 2100), (200, 120, 90)).save(big, quality=80)
    seen = []
    original = Image.Image.load

    def spy(self):
        out = original(self)
        seen.append(self.size)
        return out

    monkeypatch.setattr(Image.Image, "load", spy)
    img = load_image(big)
    assert max(img.size) <= DEFAULT_MAX_SIDE and img.size[0] == 2 * img.size[1]
    # JPEG draft mode: the decoder itself produced at most half the original width (never 4200 px wide)
    assert seen and max(w for w, _ in seen) <= 2100
    png = tmp_path / "canvas.png"
    Image.new("L", (3000, 1000), 7).save(png)
    assert load_image(png).size == (DEFAULT_MAX_SIDE, round(DEFAULT_MAX_SIDE / 3))
    assert load_image(png, max_side=None).size == (3000, 1000)


# --- items 1 and 2: output folders ----------------------------------------------------------------------------

def test_output_dir_refuses_files_and_foreign_folders(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("x")
    with pytest.raises(MpoxscopeError, match="existing file, not a folder"):
        check_output_dir(f, "train")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "thesis.txt").write_text("years of work")
    with pytest.raises(MpoxscopeError, match=r"victim: folder holds files mpoxscope did not write \(thesis.txt\)"):
        check_output_dir(victim, "evaluate")
    with pytest.raises(MpoxscopeError):
        clear_output_dir(victim, "train")
    assert (victim / "thesis.txt").read_text() == "years of work"
    assert check_output_dir(tmp_path / "new", "train") == tmp_path / "new"


def test_overwrite_removes_only_what_mpoxscope_wrote(tmp_path):
    run = mark_output_dir(tmp_path / "run", "train")
    for name in ("model.json", "best.safetensors", "metrics.jsonl", ".best.safetensors.abc.tmp"):
        (run / name).write_text("old")
    (run / "my_notes.txt").write_text("mine")  # added by the user after the run
    kept = clear_output_dir(run, "train")
    assert kept == ["my_notes.txt"]
    assert sorted(p.name for p in run.iterdir()) == [OUTPUT_MARKER, "my_notes.txt"]


def test_overwrite_never_matches_a_users_files_by_a_broad_pattern(tmp_path):
    """A folder of the user's own weights and features is not an output (no marker, no mpoxscope JSON); in a
    marked run folder, --overwrite removes only the exact names mpoxscope writes."""
    mine = tmp_path / "mine"
    (mine / "features").mkdir(parents=True)
    for name in ("my_resnet50.pt", "embeddings.npy", "cache_settings.json", "features/x.npy"):
        (mine / name).write_text("mine")
    for kind in ("train", "cv", "evaluate"):
        with pytest.raises(MpoxscopeError, match="did not write"):
            check_output_dir(mine, kind)
    lookalike = tmp_path / "lookalike"  # names an evaluate writes, but the user's metrics file
    (lookalike / "run").mkdir(parents=True)
    (lookalike / "metrics.json").write_text(json.dumps({"loss": 0.1}))
    (lookalike / "README.md").write_text("mine")
    with pytest.raises(MpoxscopeError, match="did not write"):
        check_output_dir(lookalike, "evaluate")
    run = mark_output_dir(tmp_path / "run", "train")
    for name in ("best.safetensors", "resume.pt", "weights.pt", "embeddings.npz", "model.int8.onnx", "MODEL_CARD.md"):
        (run / name).write_text("x")
    (run / "features").mkdir()
    assert clear_output_dir(run, "train") == ["embeddings.npz", "features", "weights.pt"]


def test_unmarked_old_run_folder_is_accepted(tmp_path):
    old = tmp_path / "old_run"
    old.mkdir()
    for name in ("best.safetensors", "last.safetensors", "train_state.json"):
        (old / name).write_text("x")
    with pytest.raises(MpoxscopeError, match="did not write"):  # our names, but nothing says mpoxscope wrote them
        check_output_dir(old, "train")
    (old / "model.json").write_text(json.dumps({"format_version": 1, "classes": ["a", "b"], "model": {}}))
    assert check_output_dir(old, "train") == old
    assert check_output_dir(old, "evaluate") == old  # evaluate RUN --out RUN on a run made before markers
    ex = tmp_path / "old_explain"
    (ex / "img1").mkdir(parents=True)
    (ex / "img1" / "panel.png").write_bytes(b"x")
    (ex / "index.html").write_text("x")
    (ex / "summary.json").write_text(json.dumps({"images": []}))
    assert check_output_dir(ex, "explain") == ex
    photos = tmp_path / "photos"
    (photos / "Mpox").mkdir(parents=True)
    (photos / "Mpox" / "a.png").write_bytes(b"x")  # a data folder is not an explain output
    with pytest.raises(MpoxscopeError, match="did not write"):
        check_output_dir(photos, "explain")


def test_output_file_checks(tmp_path):
    with pytest.raises(MpoxscopeError, match="names a folder"):
        check_output_file(tmp_path, (".onnx",))
    other = tmp_path / "report.docx"
    other.write_text("x")
    with pytest.raises(MpoxscopeError, match="not .onnx"):
        check_output_file(other, (".onnx",))
    assert check_output_file(tmp_path / "m.onnx", (".onnx",)).name == "m.onnx"


def test_output_file_replaces_only_an_earlier_card_or_export(tmp_path):
    """`card --out README.md` must not replace the project's README, nor `export --out` someone else's model;
    an earlier card (or export) of mpoxscope's may be replaced."""
    import onnx
    from onnx import TensorProto, helper

    from mpoxscope.export.onnx import META_KEY, is_mpoxscope_onnx
    from mpoxscope.fileio import is_model_card

    readme = tmp_path / "README.md"
    readme.write_text("# My project\n\nGenerated by mpoxscope on 2026-01-01 from `model.json`.\n")
    with pytest.raises(MpoxscopeError, match="did not write"):
        check_output_file(readme, (".md",), ours=is_model_card)
    card = tmp_path / "card.md"
    card.write_text("# Model card: x\n\n> not a device\n\nGenerated by mpoxscope on 2026-01-01 from `model.json`.\n")
    assert check_output_file(card, (".md",), ours=is_model_card) == card
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    theirs, ours = tmp_path / "theirs.onnx", tmp_path / "ours.onnx"
    onnx.save(helper.make_model(graph), str(theirs))
    model = helper.make_model(graph)
    helper.set_model_props(model, {META_KEY: "{}"})
    onnx.save(model, str(ours))
    with pytest.raises(MpoxscopeError, match="did not write"):
        check_output_file(theirs, (".onnx",), ours=is_mpoxscope_onnx)
    assert check_output_file(ours, (".onnx",), ours=is_mpoxscope_onnx) == ours
    (tmp_path / "junk.onnx").write_bytes(b"not a model")  # unreadable: not recognised, refused
    with pytest.raises(MpoxscopeError, match="did not write"):
        check_output_file(tmp_path / "junk.onnx", (".onnx",), ours=is_mpoxscope_onnx)
    assert readme.read_text().startswith("# My project") and theirs.stat().st_size > 0


def _png_bytes(size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


# --- items 6, 14, 15 (explain) -------------------------------------------------------------------------------

def _png(path, colour=(180, 90, 70), size=(96, 96)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format="PNG")
    return path


def test_explain_output_names_stay_inside_out_and_never_collide(tiny_run, tmp_path, capsys):
    from mpoxscope.cli import main

    dots = _png(tmp_path / "in" / "...png")          # stem ".."
    a = _png(tmp_path / "in" / "a" / "x.png")
    b = _png(tmp_path / "in" / "b" / "X.png", (60, 160, 90))  # same stem up to case
    page = _png(tmp_path / "in" / "index.html.png")  # stem of the gallery's own page
    out = tmp_path / "deep" / "out"
    rc = main(["explain", str(tiny_run), str(dots), str(a), str(b), str(page), "--out", str(out), "--method",
               "gradcam", "--no-attention", "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    assert not (tmp_path / "deep" / "panel.png").exists() and not (tmp_path / "deep" / "gradcam.npy").exists()
    assert (out / "index.html").is_file()
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert len(folders) == 4 and len({f.casefold() for f in folders}) == 4 and "index.html-2" in folders
    assert all((out / f / "panel.png").is_file() for f in folders)
    summary = json.loads((out / "summary.json").read_text())
    assert len({e["panel"] for e in summary["images"]}) == 4


def test_explain_all_leaves_out_scorecam_and_says_so(tiny_run, tmp_path, capsys):
    from mpoxscope.cli import main
    from mpoxscope.explain.methods import parse_methods

    assert "scorecam" not in parse_methods("all") and "gradcam" in parse_methods("all")
    assert parse_methods("all,scorecam")[-1] == "scorecam"
    img = _png(tmp_path / "one.png")
    rc = main(["explain", str(tiny_run), str(img), "--out", str(tmp_path / "o"), "--method", "all",
               "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 0 and "--method all leaves out scorecam" in err
    panel = Image.open(tmp_path / "o" / "one" / "panel.png")
    # 1 + 7 pictures wrap into rows: the panel is not a thin strip of thumbnails
    assert panel.height / panel.width > 0.4


def test_target_class_accepts_aliases():
    from mpoxscope.explain.pipeline import resolve_class

    classes = ["Mpox", "Chickenpox", "Measles"]
    assert resolve_class("Monkeypox", classes) == 0 and resolve_class("varicella", classes) == 1
    with pytest.raises(MpoxscopeError, match="unknown class 'Flu'"):
        resolve_class("Flu", classes)


def test_explain_refuses_foreign_out_before_loading_anything(tmp_path, capsys):
    from mpoxscope.cli import main

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "thesis.txt").write_text("x")
    rc = main(["explain", str(tmp_path / "no_run"), str(tmp_path / "none.png"), "--out", str(victim)])
    assert rc == 2 and "did not write (thesis.txt)" in capsys.readouterr().err


# --- items 1 and 2 through the CLI ----------------------------------------------------------------------------

def test_overwrite_with_a_bad_data_path_deletes_nothing(tmp_path, capsys):
    from mpoxscope.cli import main

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "thesis.txt").write_text("years of work")
    rc = main(["train", str(tmp_path / "no" / "such" / "path"), "--out", str(victim), "--overwrite"])
    assert rc == 2 and (victim / "thesis.txt").read_text() == "years of work"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did not write (thesis.txt)" in err


def test_overwrite_of_a_run_checks_data_before_deleting(tmp_path, capsys):
    from mpoxscope.cli import main

    run = mark_output_dir(tmp_path / "run", "train")
    (run / "model.json").write_text("{}")
    (run / "notes.txt").write_text("mine")
    rc = main(["train", str(tmp_path / "missing_data"), "--out", str(run), "--overwrite"])
    assert rc == 2 and "data folder not found" in capsys.readouterr().err
    assert (run / "model.json").is_file() and (run / "notes.txt").is_file()


@pytest.mark.parametrize("command", ["train", "evaluate", "cv", "audit", "explain"])
def test_out_naming_an_existing_file_is_refused_up_front(command, tmp_path, capsys):
    from mpoxscope.cli import main

    existing = tmp_path / "results.txt"
    existing.write_text("x")
    data = str(tmp_path / "no_data")  # never reached: --out is checked first
    argv = {"train": ["train", data], "evaluate": ["evaluate", str(tmp_path / "no_run"), data],
            "cv": ["cv", data], "audit": ["audit", data],
            "explain": ["explain", str(tmp_path / "no_run"), data]}[command]
    assert main([*argv, "--out", str(existing)]) == 2
    err = capsys.readouterr().err
    assert "existing file, not a folder" in err and err.count("\n") == 1


def test_export_and_card_refuse_a_folder_or_foreign_file(tmp_path, capsys):
    from mpoxscope.cli import main

    other = tmp_path / "thesis.docx"
    other.write_text("x")
    assert main(["export", str(tmp_path / "run"), "--out", str(other)]) == 2
    assert "not .onnx" in capsys.readouterr().err
    assert main(["card", str(tmp_path / "run"), "--out", str(tmp_path)]) == 2
    assert "names a folder" in capsys.readouterr().err
    assert other.read_text() == "x"


# --- item 15: argparse abbreviations --------------------------------------------------------------------------

def test_abbreviated_options_are_refused(tmp_path, capsys):
    from mpoxscope.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", str(tmp_path), "--out", str(tmp_path / "r"), "--epoch", "1"])
    assert e.value.code == 2 and "--epoch" in capsys.readouterr().err


# --- item 15: the official split one level above DATA/images --------------------------------------------------

def test_split_file_found_above_the_images_folder(tmp_path):
    import csv

    from mpoxscope.data.protocol import resolve_folds
    from mpoxscope.data.samples import load_samples

    rows = []
    for cls, code in (("Mpox", "MKP"), ("Measles", "MSL")):
        for p in range(1, 5):
            name = f"{code}_{p:02d}_01.png"
            _png(tmp_path / "DATA" / "images" / cls / name, (p * 40, 90, 70), (16, 16))
            split = {1: "train", 2: "train", 3: "validation", 4: "test"}[p]
            rows.append({"fold": "fold1", "split": split, "filename": name})
    with open(tmp_path / "DATA" / "folds.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["fold", "split", "filename"])
        w.writeheader()
        w.writerows(rows)
    for root in (tmp_path / "DATA", tmp_path / "DATA" / "images"):
        folds, source = resolve_folds(load_samples(root))
        assert source == "split file folds.csv" and [f.name for f in folds] == ["fold1"]
        assert len(folds[0].test) == 2


# --- item 9: model.json schema, damaged weights, resume.pt -----------------------------------------------------

@pytest.fixture
def run_copy(tiny_run, tmp_path):
    import shutil

    return shutil.copytree(tiny_run, tmp_path / "run", ignore=shutil.ignore_patterns("*.onnx"))


@pytest.mark.parametrize("field, value, message", [
    ("classes", 6, "field 'classes' must be a list of at least two distinct class names"),
    ("classes", ["Mpox", "Mpox"], "field 'classes'"),
    ("image_size", "big", "field 'image_size' must be an integer"),
    ("model.num_heads", 3, "field 'model.num_heads' must be a divisor of model.d_model"),
    ("model.d_model", -8, "field 'model.d_model' must be a positive integer"),
    ("normalization.std", [0.2, 0.0, 0.2], "field 'normalization.std' must be a list of 3 finite numbers > 0"),
    ("normalization.mean", [0.5, "x", 0.5], "field 'normalization.mean'"),
    ("calibration.temperature", 0, "field 'calibration.temperature' must be a finite number > 0"),
    ("calibration.temperature", -1.0, "field 'calibration.temperature'"),
    ("calibration.temperature", float("nan"), "field 'calibration.temperature'"),
    ("tta", "d4", "field 'tta' must be an object whose views"),
    ("tta.views", ["id", "spin"], "field 'tta'"),
    ("members", "ab", "field 'members' must be a list"),
    ("kind", 3, "field 'kind'"),
])
def test_model_json_fields_are_validated_at_load(run_copy, capsys, field, value, message):
    from mpoxscope.cli import main

    meta = json.loads((run_copy / "model.json").read_text())
    target = meta
    *parents, leaf = field.split(".")
    for key in parents:
        target = target.setdefault(key, {})
    target[leaf] = value
    (run_copy / "model.json").write_text(json.dumps(meta))  # NaN is written as the JSON extension NaN
    img = _png(run_copy.parent / "x.png")
    assert main(["predict", str(run_copy), str(img), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_nan_weights_are_refused_never_reported_as_a_class(run_copy, capsys):
    from safetensors.torch import load_file, save_file

    from mpoxscope.cli import main

    state = load_file(str(run_copy / "best.safetensors"))
    name = next(k for k in state if k.startswith("head.") and state[k].is_floating_point())
    state[name] = state[name] * float("nan")
    save_file(state, str(run_copy / "best.safetensors"))
    img = _png(run_copy.parent / "x.png")
    assert main(["predict", str(run_copy), str(img), "--device", "cpu"]) == 2
    out, err = capsys.readouterr()
    assert "NaN or infinite" in err and name in err and "Mpox" not in out


def test_non_finite_probabilities_name_no_class():
    from mpoxscope.engine.cli import _refuse_non_finite
    from mpoxscope.engine.predict import Prediction

    bad = _refuse_non_finite(Prediction("x.png", "Mpox", float("nan"), {"Mpox": float("nan"), "HFMD": 0.1}))
    assert bad.label is None and bad.error and "non-finite" in bad.error
    good = Prediction("y.png", "Mpox", 0.9, {"Mpox": 0.9, "HFMD": 0.1})
    assert _refuse_non_finite(good) is good


def test_resume_file_with_objects_is_one_line(tmp_path):
    import pickle

    import torch

    from mpoxscope.engine.rundir import RESUME, load_epoch

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    (tmp_path / RESUME).write_bytes(pickle.dumps({"epoch": 1, "hook": print}))  # a pickle with an object
    with pytest.raises(MpoxscopeError, match="resume.pt: not a resumable mpoxscope checkpoint"):
        load_epoch(tmp_path, model, opt, sched, write=False)
    torch.save([1, 2, 3], tmp_path / RESUME)  # tensors-only but not ours
    with pytest.raises(MpoxscopeError, match="resume.pt: not a resumable mpoxscope checkpoint"):
        load_epoch(tmp_path, model, opt, sched, write=False)


# --- item 15: card finds the README's evaluation folder ---------------------------------------------------------

def test_card_finds_metrics_in_run_eval(run_copy, tmp_path):
    from mpoxscope.card import write_card

    (run_copy / "val").mkdir()
    (run_copy / "val" / "metrics.json").write_text(json.dumps(
        {"protocol": "MSLD v2.0, split file folds.csv, fold1, validation", "accuracy": 0.5, "n_images": 10}))
    text = write_card(run_copy, tmp_path / "card.md").read_text()
    assert "Held-out test metrics: not recorded" in text  # a validation evaluation is never called "test"
    (run_copy / "eval").mkdir()
    (run_copy / "eval" / "metrics.json").write_text(json.dumps(
        {"protocol": "MSLD v2.0, split file folds.csv, fold1, test", "accuracy": 0.8123, "n_images": 74}))
    text = write_card(run_copy, tmp_path / "card.md").read_text()
    assert "Held-out test metrics: not recorded" not in text
    assert "eval/metrics.json" in text and ("81.2" in text or "0.812" in text)


def test_card_names_the_split_train_recorded():
    # `train` records the split as data.split_source; the card said "Split: not recorded" beside it.
    from mpoxscope.card.card import build_card

    meta = {"classes": ["Mpox", "Healthy"],
            "data": {"dataset": "MSLD v2.0", "split_source": "split file folds.csv", "fold": "fold1"}}
    text = build_card(meta)
    assert "**Split**: split file folds.csv" in text and "**Split source**" not in text


# --- item 10: hidden files and folders are never picked up from a folder --------------------------------------

def test_hidden_files_and_folders_are_never_picked_up(tmp_path):
    from mpoxscope.data.samples import load_samples
    from mpoxscope.engine.predict import expand_inputs

    for cls in ("Mpox", "Healthy"):
        d = tmp_path / "data" / cls
        (d / ".thumbnails").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(d / f"{cls}_1_01.jpg")
        (d / f"._{cls}_1_01.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS resource fork
        Image.new("RGB", (8, 8)).save(d / ".thumbnails" / f"{cls}_9_01.jpg")
    names = sorted(s.path.name for s in load_samples(tmp_path / "data").samples)
    assert names == ["Healthy_1_01.jpg", "Mpox_1_01.jpg"]
    assert sorted(p.name for p in expand_inputs([tmp_path / "data"])) == names
    assert expand_inputs([tmp_path / "data" / "Mpox" / "._Mpox_1_01.jpg"])  # named explicitly: kept, reported


# --- item 13: epoch lines say how long the epoch took ------------------------------------------------------------

def test_epoch_lines_show_seconds(synthetic_root, tmp_path):
    import re

    from mpoxscope.config import ModelConfig, TrainConfig
    from mpoxscope.data.protocol import resolve_folds
    from mpoxscope.data.samples import load_samples
    from mpoxscope.engine.train import train

    data = load_samples(synthetic_root)
    folds, _ = resolve_folds(data, None, n_folds=3)
    lines: list[str] = []
    train(data, folds[0], ModelConfig(image_size=64, d_model=32, num_heads=4),
          TrainConfig(epochs=2, batch_size=16, cache_views=1, warmup_epochs=0, patience=10), tmp_path / "run",
          {"dataset": "synthetic"}, progress=True, log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert len(epochs) == 2 and all(re.search(r"\s\d+(\.\d+)? s\b", line) for line in epochs), epochs


# --- item 14: a panel of many maps stays readable (rows of four, not one strip of thumbnails) -------------------

def test_panel_of_nine_maps_wraps_into_readable_rows(tmp_path):
    import numpy as np

    from mpoxscope.explain.render import save_panel_png

    maps = {f"m{i}": np.random.default_rng(i).random((7, 7)).astype(np.float32) for i in range(9)}
    path = save_panel_png(Image.new("RGB", (224, 224), (200, 150, 120)), maps, tmp_path / "panel.png", "title")
    with Image.open(path) as panel:
        w, h = panel.size
    assert h > 0.5 * w  # 10 tiles in rows of four: three rows, not a 10:1 strip
    assert w / 4 >= 150  # each tile at least 150 px wide


# --- item 15: predict --onnx FILE; item 10: --cache-views 0 on a frozen backbone --------------------------------

@pytest.mark.slow
def test_predict_uses_the_onnx_file_export_wrote(run_copy, tmp_path, capsys):
    from mpoxscope.cli import main
    from mpoxscope.export.onnx import ONNX_FILE

    img = _png(tmp_path / "x.png")
    onnx_file = tmp_path / "exports" / "fold1.onnx"
    assert main(["export", str(run_copy), "--out", str(onnx_file), "--parity-images", str(img)]) == 0
    capsys.readouterr()
    assert main(["predict", str(run_copy), str(img), "--onnx", str(onnx_file), "--format", "csv"]) == 0
    assert str(img) in capsys.readouterr().out
    assert not (run_copy / ONNX_FILE).exists()  # the given file was used; nothing was re-exported


@pytest.mark.slow
def test_cache_views_zero_with_a_frozen_backbone_trains(synthetic_root, tmp_path, capsys):
    from mpoxscope.cli import main

    rc = main(["train", str(synthetic_root), "--out", str(tmp_path / "r"), "--preset", "tiny", "--epochs", "1",
               "--cache-views", "0", "--freeze", "--image-size", "64", "--split-file", "none", "--quiet",
               "--device", "cpu"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert (tmp_path / "r" / "best.safetensors").is_file()
    protocol = json.loads((tmp_path / "r" / "model.json").read_text())["validation"]["protocol"]
    assert ", split " not in protocol and "grouped stratified 5-fold" in protocol  # no "split split file"


# --- item 13: progress outside a terminal -----------------------------------------------------------------------

class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_plain_progress_prints_count_rate_and_eta_every_interval():
    from mpoxscope.progress import PlainProgress

    out, clock = io.StringIO(), _Clock()
    bar = PlainProgress(total=100, desc="caching features", unit="img", stream=out, interval=10, clock=clock)
    for _ in range(20):  # 20 images in 8 s: under the interval, nothing printed yet
        clock.t += 0.4
        bar.update(1)
    assert out.getvalue() == ""
    clock.t = 10.0
    bar.update(5)  # 25 images in 10 s
    bar.set_postfix(loss=0.5)
    line = out.getvalue().strip()
    assert line == "caching features: 25/100 (25%), 2.5 img/s, elapsed 0:10, ETA 0:30"
    bar.close()
    assert out.getvalue().strip().splitlines()[-1].startswith("caching features: done 25/100 img in 0:10")


def test_progress_is_plain_when_not_a_tty_and_silent_when_disabled():
    from mpoxscope.progress import PlainProgress, progress

    out = io.StringIO()  # not a terminal
    bar = progress(range(3), desc="x", stream=out, interval=0)
    assert isinstance(bar, PlainProgress) and list(bar) == [0, 1, 2]
    assert "x: done 3/3" in out.getvalue() and out.getvalue().count("\n") == 4
    quiet = io.StringIO()
    silent = progress(total=5, stream=quiet, disable=True, interval=0)
    silent.update(5)
    silent.set_postfix(acc=1.0)
    silent.close()
    assert quiet.getvalue() == ""


def test_progress_is_tqdm_on_a_terminal():
    from tqdm.auto import tqdm

    from mpoxscope.progress import progress

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    bar = progress(total=2, desc="y", stream=Tty())
    assert isinstance(bar, tqdm)
    bar.update(2)
    bar.close()


@pytest.mark.parametrize("mode", ["RGBA", "P", "I;16", "LA", "CMYK", "RGB"])
def test_reduced_images_keep_colours_and_orientation(tmp_path, mode):
    import numpy as np

    src = Image.new("RGB", (1100, 550), (30, 160, 220))
    src.paste((250, 20, 20), (0, 0, 275, 138))  # a red top-left corner shows the orientation
    img = src.convert(mode) if mode != "I;16" else src.convert("L").convert("I;16")
    path = tmp_path / ("big.jpg" if mode in ("CMYK", "RGB") else "big.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: shown rotated 90 degrees clockwise
    img.save(path, exif=exif)
    out = load_image(path, max_side=256)  # factor 2: the strip reduction, then a thumbnail
    assert out.mode == "RGB" and out.size == (128, 256)  # upright: portrait
    ref = load_image(path, max_side=None)
    assert ref.size == (550, 1100)
    diff = np.abs(np.asarray(ref.resize(out.size, Image.Resampling.BOX), dtype=float) - np.asarray(out, dtype=float))
    # 16-bit greyscale is min-max scaled to 8 bits, and resampling ringing moves the min and max a little
    assert diff.mean() < (16 if mode == "I;16" else 4), diff.mean()
    corner, rest = np.asarray(out)[:40, -40:].mean(), np.asarray(out)[-40:, :40].mean()
    ref_corner, ref_rest = np.asarray(ref)[:160, -160:].mean(), np.asarray(ref)[-160:, :160].mean()
    assert (corner < rest) == (ref_corner < ref_rest)  # the red corner moved top-right in both


def test_export_parity_uses_the_data_model_json_records(synthetic_root, tmp_path, monkeypatch):
    """Issue 11 item 15: the export parity check runs on the run's own training data when it is there (its
    location is recorded in model.json), not on synthetic pictures."""
    from mpoxscope.export.onnx import default_parity_images

    monkeypatch.setenv("MPOXSCOPE_MSLD", str(tmp_path / "absent"))
    images, source = default_parity_images(128, n=3, data_root=synthetic_root)
    assert len(images) == 3 and source.startswith("real images of the run's training data")
    _, fallback = default_parity_images(128, n=2, data_root=tmp_path / "moved")
    assert "synthetic" in fallback


def test_interrupt_message_tells_the_truth(monkeypatch, capsys, tmp_path):
    """Issue 11 item 3: Ctrl-C gives one line (no traceback), exit 130, and says what resuming keeps; finished
    epochs are kept by the atomic per-epoch commit (tests/test_train.py resumes after an interrupt)."""
    import mpoxscope.cli as cli
    import mpoxscope.engine.cli as engine_cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine_cli, "run_demo", interrupted)
    assert cli.main(["demo", "--out", str(tmp_path / "x")]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "interrupted" in err and "resume from the last finished epoch" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_sigterm_stops_a_run_in_one_line_and_keeps_its_epochs(synthetic_root, tmp_path):
    """``kill PID`` (SIGTERM, what a scheduler's time limit sends) during training: one line naming the signal and
    how to resume, exit status 143, no traceback, no temporary file left, every reported epoch committed."""
    import signal
    import time

    import torch

    run = tmp_path / "r"
    cmd = [sys.executable, "-m", "mpoxscope.cli", "train", str(synthetic_root), "--out", str(run), "--preset", "tiny",
           "--epochs", "5000", "--patience", "5000", "--cache-views", "1", "--freeze", "--image-size", "64",
           "--split-file", "none", "--quiet", "--device", "cpu", "--tta", "none"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (run / "metrics.jsonl").is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[1]  # still training: 5000 epochs take minutes
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert err.strip().count("\n") == 0 and "Traceback" not in err, err
    assert "terminated (SIGTERM)" in err and "rerun the same command to resume" in err
    assert not list(run.glob(".*.tmp")), "a temporary file was left behind"
    committed = torch.load(run / "resume.pt", weights_only=True)  # the epoch's atomic commit
    assert committed["epoch"] == len(json.loads(committed["history"])) >= 1
    assert json.loads((run / "train_state.json").read_text())["status"] == "running"


def test_an_empty_folder_is_one_error_row_and_the_other_inputs_still_get_results(tiny_run, tmp_path, capsys):
    from mpoxscope.cli import main

    photo = _png(tmp_path / "a.png")
    (tmp_path / "empty").mkdir()
    rc = main(["predict", str(tiny_run), str(photo), str(tmp_path / "empty"), "--format", "json", "--device", "cpu"])
    out, err = capsys.readouterr()
    rows = {r["source"].rstrip("/").rsplit("/", 1)[-1]: r for r in json.loads(out)}
    assert rc == 1 and rows["a.png"]["label"] and rows["a.png"]["error"] is None
    assert rows["empty"]["error"] == "no images in folder" and "empty: no images in folder" in err


def test_ensemble_member_folders_stay_inside_out_whatever_a_model_json_says(tiny_run, tmp_path):
    """`ensemble` names each member's folder after its model.json; a hand-made backbone "../../x" or "/abs"
    must not become a path outside OUT/members."""
    import shutil

    from mpoxscope.engine.ensemble import check_assemble_inputs

    runs = []
    for i, backbone in enumerate(("../../escaped", "/abs/path")):
        run = tmp_path / f"r{i}"
        shutil.copytree(tiny_run, run)
        meta = json.loads((run / "model.json").read_text())
        meta["model"]["backbone"] = backbone
        (run / "model.json").write_text(json.dumps(meta))
        (run / "train_state.json").write_text(json.dumps({"status": "finished", "best_epoch": 1, "epochs_run": 1}))
        runs.append(run)
    names = [name for name, _, _ in check_assemble_inputs(runs)]
    assert all("/" not in n and not n.startswith(".") for n in names) and len(set(names)) == 2
    members = tmp_path / "out" / "members"
    assert all((members / n).resolve().parent == members.resolve() for n in names)


def test_an_atomic_write_reaches_the_disk_before_its_rename(tmp_path, monkeypatch):
    """The new file's bytes are fsynced before the rename that publishes them, and the folder after it, so a
    power cut cannot leave a renamed but empty checkpoint; a failed write leaves the old file and no temporary."""
    import os

    from mpoxscope import fileio

    events = []
    real_fsync, real_replace, real_open = os.fsync, os.replace, os.open
    names = {}

    def spy_open(path, flags, *a, **k):
        fd = real_open(path, flags, *a, **k)
        names[fd] = os.path.basename(str(path))
        return fd

    monkeypatch.setattr(fileio.os, "open", spy_open)
    monkeypatch.setattr(fileio.os, "fsync", lambda fd: (events.append(("fsync", names.get(fd))), real_fsync(fd)))
    monkeypatch.setattr(fileio.os, "replace", lambda a, b: (events.append(("replace", None)), real_replace(a, b)))
    target = tmp_path / "state.json"
    fileio.write_json(target, {"epoch": 1})
    kinds = [e[0] for e in events]
    assert kinds == ["fsync", "replace", "fsync"]
    assert events[0][1].startswith(".state.json.") and events[2][1] == tmp_path.name
    with pytest.raises(RuntimeError), fileio.atomic_path(target):
        raise RuntimeError("killed mid-write")
    assert fileio.read_json(target) == {"epoch": 1} and not list(tmp_path.glob(".*.tmp"))


def _hostile_inputs(folder, synthetic_root):
    """A good image, the same image under a name that is not UTF-8, under a name a spreadsheet runs as a formula,
    a text file whose name forges a second error line, a name too long for the OS, and an empty folder."""
    import os
    import shutil

    folder.mkdir()
    good = sorted((synthetic_root / "Healthy").iterdir())[0]
    shutil.copy(good, folder / "good.png")
    bad_name = os.path.join(os.fsencode(folder), b"bad\xff\xfename.png")
    shutil.copy(good, bad_name)
    shutil.copy(good, folder / "=HYPERLINK(1).png")
    (folder / "a\nmpoxscope predict: ok.png").write_text("not an image")
    (folder / "empty").mkdir()
    return [folder / "good.png", os.fsdecode(bad_name), folder / "=HYPERLINK(1).png",
            folder / "a\nmpoxscope predict: ok.png", folder / ("x" * 300 + ".png"), folder / "empty"]


def test_predict_csv_survives_hostile_file_names_on_a_strict_utf8_stream(tiny_run, synthetic_root, tmp_path,
                                                                          monkeypatch):
    """Names that are not UTF-8, that start like a spreadsheet formula, hold a newline or are too long for the OS:
    every input gets one row (the readable ones a result), the CSV and each error line stay one line of valid
    UTF-8, and a formula is written as text — where a strict UTF-8 stdout used to raise halfway through."""
    import csv
    import io
    import sys

    from mpoxscope.cli import main

    inputs = _hostile_inputs(tmp_path / "in", synthetic_root)
    monkeypatch.chdir(tmp_path / "in")
    inputs[2] = inputs[2].name  # "=HYPERLINK(1).png", as `predict .` in that folder would name it
    out, err = io.BytesIO(), io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(out, encoding="utf-8", errors="strict", newline=""))
    monkeypatch.setattr(sys, "stderr", io.TextIOWrapper(err, encoding="utf-8", errors="strict"))
    code = main(["predict", str(tiny_run), *map(str, inputs), "--format", "csv", "--device", "cpu"])
    sys.stdout.flush(), sys.stderr.flush()
    written, complaints = out.getvalue().decode("utf-8"), err.getvalue().decode("utf-8")  # strict: valid UTF-8
    monkeypatch.setattr(sys, "stdout", sys.__stdout__)
    monkeypatch.setattr(sys, "stderr", sys.__stderr__)
    rows = list(csv.DictReader(io.StringIO(written)))
    assert code == 1 and len(rows) == len(inputs)
    assert [bool(r["label"]) for r in rows] == [True, True, True, False, False, False]
    assert rows[1]["source"].endswith("bad\\xff\\xfename.png")
    assert rows[2]["source"] == "'=HYPERLINK(1).png"
    errors = complaints.splitlines()
    assert len(errors) == 3 and all(e.startswith("mpoxscope predict: error: ") for e in errors)
    assert "File name too long" in errors[1] and "no images in folder" in errors[2]


def test_explain_reports_an_empty_folder_and_draws_a_non_utf8_name(tiny_run, synthetic_root, tmp_path, capsys):
    """One empty folder no longer stops the others (it is one failed entry), and an image whose name is not
    UTF-8 is explained: its titles and the gallery show the name escaped instead of crashing matplotlib."""
    from mpoxscope.cli import main

    inputs = _hostile_inputs(tmp_path / "in", synthetic_root)
    code = main(["explain", str(tiny_run), str(inputs[0]), inputs[1], str(inputs[5]), "--out", str(tmp_path / "ex"),
                 "--method", "gradcam", "--no-attention", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1 and "no images in folder" in err
    summary = json.loads((tmp_path / "ex" / "summary.json").read_text())
    sources = [e["source"] for e in summary["images"]]
    assert any(s.endswith("bad\\xff\\xfename.png") for s in sources) and len(sources) == 3
    assert (tmp_path / "ex" / "index.html").is_file()


def test_a_bomb_header_is_refused_in_our_one_line_without_pillows_warning(tmp_path):
    """A PNG whose header claims 10,000 x 10,000 pixels (over Pillow's ~89 MP warning threshold, under its error
    threshold) and one claiming 20,000 x 20,000 (over both): each is one ImageError naming our own limit, and
    Pillow's two-line DecompressionBombWarning no longer precedes it."""
    import struct
    import subprocess
    import sys
    import zlib

    from mpoxscope.data.images import MAX_PIXELS, load_image
    from mpoxscope.errors import ImageError

    def header_only_png(side: int) -> bytes:
        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")

    for side in (10_000, 20_000):
        path = tmp_path / f"bomb{side}.png"
        path.write_bytes(header_only_png(side))
        with pytest.raises(ImageError) as e:
            load_image(path)
        assert f"more than {MAX_PIXELS:,} pixels" in str(e.value) or f"limit {MAX_PIXELS:,}" in str(e.value)
        # pytest's own warning capture overrides library filters, so what a user sees is checked in a fresh process
        code = (f"from mpoxscope.data.images import load_image\n"
                f"try:\n    load_image({str(path)!r})\nexcept Exception:\n    pass")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "Warning" not in done.stderr, done.stderr


# --- session 21: arguments checked before work, and other commands' files left alone -----------------------------
def _refused(argv: list[str], capsys, *words: str) -> str:
    """``mpoxscope ARGV`` exits 2 with one stderr line holding every word (no traceback)."""
    from mpoxscope.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(w in err for w in words), err
    return err


def test_cv_and_protocols_refuse_bad_options_before_making_out(synthetic_root, tmp_path, capsys):
    """Each used to fail only after decoding images, training a fold or running another protocol (or with a
    traceback), with --out already made."""
    from mpoxscope.config import DataConfig
    from mpoxscope.engine.runner import prepare

    data, out = str(synthetic_root), tmp_path / "out"
    tiny = ["--preset", "tiny", "--split-file", "none", "--folds", "3"]
    _refused(["cv", data, "--out", str(out), *tiny, "--backbone", "nosuchnet"], capsys, "--backbone", "nosuchnet")
    _refused(["cv", data, "--out", str(out), *tiny, "--device", "bogus"], capsys, "unknown device")
    _refused(["cv", data, "--out", str(out), *tiny, "--exclude-leaks", "--near-dup-threshold", "100"], capsys,
             "--near-dup-threshold", "64")
    _refused(["cv", data, "--out", str(out), *tiny, "--near-dup-threshold", "8"], capsys, "--exclude-leaks")
    for bad in (["--epochs", "0"], ["--batch-size", "0"], ["--lr", "nan"]):
        _refused(["protocols", data, "--out", str(out), *tiny, "--protocols", "official", *bad], capsys,
                 bad[0])
    _refused(["protocols", data, "--out", str(out), "--quick", "--image-size", "0"], capsys, "--image-size")
    _refused(["protocols", data, "--out", str(out), "--quick", "--copies", "100000000"], capsys, "--copies")
    split = tmp_path / "split.csv"  # an official split, so that --folds counts only the image-level folds
    prepared = prepare(DataConfig(root=data, split_file=None, folds=3))
    split.write_text("fold,split,filename\n" + "".join(
        f"{f.name},{part},{prepared.data.samples[i].filename}\n" for f in prepared.folds
        for part in ("train", "validation", "test") for i in f.indices(part)))
    _refused(["protocols", data, "--out", str(out), "--quick", "--split-file", str(split), "--folds", "1",
              "--protocols", "official,image-level"], capsys, "--folds", "too few")
    fake = tmp_path / "fakecv"
    fake.mkdir()
    (fake / "cv_summary.json").write_text("[1, 2]")
    _refused(["protocols", data, "--out", str(out), *tiny, "--official-from", str(fake), "--protocols", "official"],
             capsys, "not a cv summary")
    _refused(["cv", data, "--out", str(out), *tiny, "--groups-csv", str(tmp_path)], capsys, "not a regular file")
    assert not out.exists()


def test_evaluate_checks_its_inputs_and_never_replaces_a_cv_s_plots(tiny_run, tmp_path, capsys):
    """evaluate made --out (with its marker) before reading the run; and into a cv's folder it replaced the cv's
    pooled reliability and risk-coverage plots."""
    out = tmp_path / "eval"
    _refused(["evaluate", str(tmp_path / "nope"), "--out", str(out)], capsys, "not a trained run")
    _refused(["evaluate", str(tiny_run), str(tmp_path / "nodata"), "--out", str(out)], capsys, "DATA not found")
    _refused(["evaluate", str(tiny_run), "--device", "bogus", "--out", str(out)], capsys, "unknown device")
    assert not out.exists()
    cv_out = mark_output_dir(tmp_path / "cv", "cv")
    (cv_out / "reliability.png").write_bytes(b"cv's own")
    _refused(["evaluate", str(tiny_run), "--out", str(cv_out)], capsys, "`cv` output", "reliability.png")
    assert (cv_out / "reliability.png").read_bytes() == b"cv's own"
    check_output_dir(mark_output_dir(tmp_path / "run", "train"), "evaluate")  # evaluate RUN --out RUN still works
    check_output_dir(cv_out, "screen")  # screen rewrites a cv's screening files by the cv's own function
    _refused(["train", str(tmp_path), "--out", str(cv_out)], capsys, "`cv` output", "screening")


def test_card_never_replaces_a_model_card_it_did_not_write(tiny_run, tmp_path, capsys):
    import shutil

    from mpoxscope.cli import main

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "MODEL_CARD.md").write_text("# My own notes\n")
    _refused(["card", str(run)], capsys, "MODEL_CARD.md", "did not write")
    assert (run / "MODEL_CARD.md").read_text() == "# My own notes\n"
    (run / "MODEL_CARD.md").unlink()
    assert main(["card", str(run)]) == 0 and main(["card", str(run)]) == 0  # its own card is replaced
    bad = tmp_path / "metrics.json"
    bad.write_text(json.dumps({"accuracy": "abc", "n_images": 3}))
    _refused(["card", str(run), "--metrics", str(bad)], capsys, "'accuracy'", "from 0 to 1")
    (tmp_path / "audit.json").write_text("[1, 2]")
    _refused(["card", str(run), "--audit", str(tmp_path / "audit.json")], capsys, "audit.json", "JSON object")


def test_model_json_records_of_the_wrong_type_are_one_line(tiny_run, tmp_path):
    """ensemble and evaluate read data/train back: a wrong type was an AttributeError/KeyError traceback."""
    import shutil

    from mpoxscope.engine.checkpoint import read_meta

    for field, value in (("data", [1, 2]), ("train", "x"), ("train", {"seed": "abc"}),
                         ("data", {"n_folds": "five"}), ("data", {"root": 3})):
        run = tmp_path / f"run_{len(list(tmp_path.iterdir()))}"
        shutil.copytree(tiny_run, run)
        meta = json.loads((run / "model.json").read_text())
        meta[field] = value
        (run / "model.json").write_text(json.dumps(meta))
        with pytest.raises(MpoxscopeError, match=f"field '{field}"):
            read_meta(run)
    meta = json.loads((tiny_run / "model.json").read_text())
    meta.pop("image_size", None)
    (run / "model.json").write_text(json.dumps(meta))
    assert read_meta(run)["image_size"] == meta["model"]["image_size"]


def test_train_reads_its_pretrained_file_before_overwrite_deletes_anything(synthetic_root, tmp_path, capsys):
    """`train --overwrite --pretrained BAD` deleted the earlier run's weights, then failed on the file."""
    import torch
    from conftest import make_run
    from safetensors.torch import save_file

    run = make_run(tmp_path / "run")
    before = sorted(p.name for p in run.iterdir())
    bad = tmp_path / "w.pth"
    bad.write_text("not weights")
    argv = ["train", str(synthetic_root), "--out", str(run), "--preset", "tiny", "--split-file", "none", "--folds",
            "3", "--overwrite", "--quiet"]
    _refused([*argv, "--pretrained", str(bad)], capsys, "w.pth", "cannot read weights")
    _refused([*argv, "--pretrained", str(tmp_path)], capsys, "a folder, not a weights file")
    other = tmp_path / "other.safetensors"  # readable, but another backbone's tensors
    save_file({"conv1.weight": torch.zeros(4, 3, 3, 3)}, str(other))
    _refused([*argv, "--pretrained", str(other)], capsys, "other.safetensors")
    assert sorted(p.name for p in run.iterdir()) == before


def test_export_refuses_foreign_files_at_its_default_paths_and_bad_numbers_up_front(tiny_run, tmp_path, capsys):
    """RUN/model.onnx and RUN/model.pixels.onnx were replaced without the check --out gets; --opset 0 fell back
    silently, --tolerance nan failed after the export, quantize-only options were ignored without --quantize."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "model.pixels.onnx").write_text("precious")
    _refused(["export", str(run), "--pixel-input"], capsys, "model.pixels.onnx", "did not write")
    assert (run / "model.pixels.onnx").read_text() == "precious" and not (run / "model.onnx").exists()
    (run / "model.onnx").write_text("mine")
    _refused(["export", str(run)], capsys, "model.onnx", "did not write")
    out = str(tmp_path / "x.onnx")
    for bad, word in ((["--opset", "0"], "--opset"), (["--tolerance", "nan"], "--tolerance"),
                      (["--float-first", "5"], "needs --quantize"), (["--calibration-method", "percentile"],
                                                                        "needs --quantize")):
        _refused(["export", str(run), "--out", out, *bad], capsys, word)
    assert (run / "model.onnx").read_text() == "mine" and not (tmp_path / "x.onnx").exists()


def test_explain_checks_its_layer_and_faithfulness_options_before_making_out(tiny_run, tmp_path, capsys):
    img = tmp_path / "a.png"
    Image.new("RGB", (64, 64), (200, 120, 90)).save(img)
    out = tmp_path / "ex"
    base = ["explain", str(tiny_run), str(img), "--out", str(out)]
    _refused([*base, "--target-layer", "bogus.layer"], capsys, "--target-layer")
    _refused([*base, "--rho-threshold", "-5"], capsys, "--rho-threshold", "needs --faithfulness")
    _refused([*base, "--faithfulness", "--rho-threshold", "nan"], capsys, "--rho-threshold")
    _refused([*base, "--faithfulness", "--faithfulness-images", "-3"], capsys, "--faithfulness-images")
    assert not out.exists()
