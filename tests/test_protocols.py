"""Evaluation protocols on synthetic data: the honest split keeps patients and augmented siblings apart, the
leaky ones do not, and the report says which is which."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mpoxscope.data.samples import Sample, SampleSet
from mpoxscope.data.splits import grouped_folds
from mpoxscope.engine.protocols import (
    BANNER,
    FoldResult,
    accuracy_arithmetic,
    expand_dataset,
    image_level_folds,
    run_protocols,
)
from mpoxscope.errors import MpoxscopeError

CLASSES = ["Mpox", "Chickenpox", "Measles"]


def _patients(n_patients: int = 30, per_patient: int = 3) -> SampleSet:
    samples = [Sample(Path(f"P{p:02d}_{i}.png"), CLASSES[p % 3], f"P{p:02d}")
               for p in range(n_patients) for i in range(per_patient)]
    return SampleSet(samples, CLASSES)


def _crossing(data: SampleSet, fold, key) -> set:
    train = {key(i) for i in (*fold.train, *fold.validation)}
    return train & {key(i) for i in fold.test}


def test_image_level_ignores_patients_and_official_never_does():
    data = _patients()
    leaky = image_level_folds(data, n_folds=5, seed=0)
    assert sorted(i for f in leaky for i in f.test) == list(range(len(data)))  # each image tested once
    patient = lambda i: data.samples[i].group  # noqa: E731
    assert any(_crossing(data, f, patient) for f in leaky)  # some test patient also in training
    for f in leaky:
        assert {data.samples[i].label for i in f.test} == set(CLASSES)  # stratified
    for f in grouped_folds(data, n_folds=5):
        assert not _crossing(data, f, patient)


def _tiny_images(root: Path) -> SampleSet:
    from PIL import Image

    rng = np.random.default_rng(0)
    samples = []
    for c, label in enumerate(CLASSES):
        for p in range(6):
            path = root / label / f"X{c}_{p:02d}_01.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)
            samples.append(Sample(path, label, f"X{c}_{p:02d}"))
    return SampleSet(samples, CLASSES, root)


def test_augment_then_split_puts_siblings_on_both_sides(tmp_path):
    data = _tiny_images(tmp_path / "data")
    logs: list[str] = []
    expanded, origin = expand_dataset(data, tmp_path / "out" / "augmented", copies=3, log=logs.append)
    assert len(expanded) == 54 and np.bincount(origin).tolist() == [3] * 18
    files = [s.path for s in expanded.samples]
    assert all(p.is_file() and str(p).startswith(str(tmp_path / "out")) for p in files)
    pixels = [np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(p)) for p in files[:3]]
    assert pixels[0].shape == (40, 48, 3) and not np.array_equal(pixels[0], pixels[1])  # distinct copies
    sibling = lambda i: origin[i]  # noqa: E731
    folds = image_level_folds(expanded, n_folds=3, seed=0)
    assert any(_crossing(expanded, f, sibling) for f in folds)
    # The honest split of the same copies, grouped by original image, never separates siblings.
    grouped = SampleSet([Sample(s.path, s.label, str(o)) for s, o in zip(expanded.samples, origin)], CLASSES)
    for f in grouped_folds(grouped, n_folds=3):
        assert not _crossing(grouped, f, sibling)
    # Rerun: nothing rewritten (copies are seeded by file name).
    expand_dataset(data, tmp_path / "out" / "augmented", copies=3, log=logs.append)
    assert "(0 written now)" in logs[-1] and "(54 written now)" in logs[0]
    with pytest.raises(MpoxscopeError, match="at least 1"):
        expand_dataset(data, tmp_path / "x", copies=0)


def _memorizer(data: SampleSet, folds, work: Path, label: str) -> list[FoldResult]:
    """A 'model' that is right exactly when an image of the same patient, or an augmented sibling, was in
    training: it isolates what leakage alone does to the score."""
    def key(s: Sample) -> str:
        return s.filename.split("__aug")[0].rsplit("_", 1)[0]  # patient of an original or of a copy

    y = np.asarray(data.targets)
    out = []
    for f in folds:
        seen = {key(data.samples[i]) for i in f.train}
        probs = np.full((len(f.test), 3), 1 / 3)
        for r, i in enumerate(f.test):
            guess = y[i] if key(data.samples[i]) in seen else (y[i] + 1) % 3
            probs[r] = 0.1
            probs[r, guess] = 0.8
        out.append(FoldResult(f.name, [data.samples[i].filename for i in f.test], y[list(f.test)], probs))
    return out


def test_run_protocols_report_flags_leaky_rows(tmp_path):
    data = _tiny_images(tmp_path / "data")
    official = grouped_folds(data, n_folds=3)
    logs: list[str] = []
    report = run_protocols(data, official, "grouped 3-fold", tmp_path / "out", _memorizer, "memorizer",
                           copies=4, n_folds=3, command="mpoxscope protocols DATA --out OUT", log=logs.append)
    res = report["protocols"]
    assert res["official"]["pooled"]["accuracy"]["value"] == 0.0  # no patient ever seen: the memorizer fails
    assert res["augment-then-split"]["pooled"]["accuracy"]["value"] > 0.9  # siblings seen: near perfect
    assert res["augment-then-split"]["n_test_total"] == 72 and not res["official"]["leaky"]
    assert "18 images" in res["official"]["pooled"]["method"]  # one image per patient here: images = patients
    # The breakdown isolates the leak: right on every copy whose sibling was trained on, wrong on the others.
    sib = res["augment-then-split"]["siblings"]
    assert sib["in_training"]["accuracy"] == 1.0 and sib["not_in_training"]["accuracy"] in (None, 0.0)
    assert sib["in_training"]["n"] + sib["not_in_training"]["n"] == 72 and sib["in_training"]["n"] > 36
    rows = (tmp_path / "out" / "work" / "augment-then-split.predictions.csv").read_text().splitlines()
    assert rows[0].startswith("fold,filename,true,predicted,") and len(rows) == 73
    assert "Where augment-then-split's score comes from" in (tmp_path / "out" / "protocols.md").read_text()
    md = (tmp_path / "out" / "protocols.md").read_text()
    assert md.count(f"LEAKY — {BANNER}") == 2 and "none (patient-level)" in md
    assert "at least **513**" in md and "at least **1026**" in md and "mpoxscope protocols DATA" in md
    assert sum(BANNER in line for line in logs) >= 4  # every leaky protocol's lines say so
    assert (tmp_path / "out" / "protocols.png").stat().st_size > 1000
    assert json.loads((tmp_path / "out" / "protocols.json").read_text())["config"] == "memorizer"


def test_augment_then_split_refuses_shared_stems_before_writing(tmp_path):
    data = _tiny_images(tmp_path / "data")
    twin = data.samples[0].path.with_suffix(".jpg")
    __import__("PIL.Image", fromlist=["Image"]).open(data.samples[0].path).save(twin)
    data = SampleSet(data.samples + [Sample(twin, data.samples[0].label, "twin")], CLASSES)
    with pytest.raises(MpoxscopeError, match=f"both have stem '{twin.stem}'"):
        expand_dataset(data, tmp_path / "out", copies=2, log=lambda _: None)
    assert not (tmp_path / "out").exists()


def test_sibling_breakdown_by_hand():
    """Two test copies: one whose sibling is in training (predicted right), one whose sibling is only in
    validation (predicted wrong); a third original's copies are all in training."""
    from mpoxscope.data.splits import Fold
    from mpoxscope.engine.protocols import origin_name, sibling_breakdown

    names = ["a__aug0.jpg", "a__aug1.jpg", "b__aug0.jpg", "b__aug1.jpg", "c__aug0.jpg", "c__aug1.jpg"]
    data = SampleSet([Sample(Path(n), CLASSES[0], n) for n in names], CLASSES)
    assert origin_name("P01_2__aug13.jpg") == "P01_2"
    fold = Fold("fold1", train=(0, 4, 5), validation=(2,), test=(1, 3))
    probs = np.array([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1]])  # a__aug1 right, b__aug1 wrong
    result = FoldResult("fold1", ["a__aug1.jpg", "b__aug1.jpg"], np.array([0, 0]), probs)
    sib = sibling_breakdown(data, [fold], [result])
    assert sib["in_training"] == {"n": 1, "share": 0.5, "accuracy": 1.0}
    assert sib["not_in_training"] == {"n": 1, "share": 0.5, "accuracy": 0.0}


def test_accuracy_arithmetic():
    a = accuracy_arithmetic(0.9981, 755)
    assert a["min_test_size"] == {1: 513, 2: 1026} and a["test_part"] == 151
    assert a["part_accuracies"][1] == pytest.approx(150 / 151)  # 99.34 %
    assert round(100 * a["fold_means"][1], 2) == 99.87 and round(100 * a["fold_means"][2], 2) == 99.74


def test_protocols_cli_quick_on_synthetic_images(tmp_path, synthetic_root, capsys, one_thread):
    from mpoxscope.cli import main

    out = tmp_path / "protocols"
    code = main(["protocols", str(synthetic_root), "--out", str(out), "--quick", "--copies", "2", "--folds", "3",
                 "--split-file", "none", "--image-size", "64", "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.count(BANNER) >= 2 and "[official] pooled accuracy" in printed
    report = json.loads((out / "protocols.json").read_text())
    assert report["protocols"]["augment-then-split"]["n_test_total"] == 2 * 72
    assert "--quick" in report["config"] and len(list((out / "augmented").rglob("*.jpg"))) == 144


def test_protocols_cli_refuses_bad_options(tmp_path, synthetic_root, capsys):
    from mpoxscope.cli import main

    assert main(["protocols", str(synthetic_root), "--out", str(tmp_path / "o"), "--protocols", "random"]) == 2
    assert "unknown random" in capsys.readouterr().err
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    assert main(["protocols", str(synthetic_root), "--out", str(repo / "out"), "--quick"]) == 2
    assert "inside the git repository" in capsys.readouterr().err
    # One stem twice: refused before the official protocol runs, and before anything is written.
    root = tmp_path / "twins"
    shutil.copytree(synthetic_root, root)
    image = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".png"))[0]
    image.with_suffix(".png" if image.suffix.lower() == ".jpg" else ".jpg").write_bytes(image.read_bytes())
    assert main(["protocols", str(root), "--out", str(tmp_path / "o2"), "--quick"]) == 2
    assert f"both have stem '{image.stem}'" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


def test_protocols_trains_ensembles_and_reads_the_official_row_from_cv(tmp_path, synthetic_root, capsys, one_thread):
    """The default preset is an ensemble: protocols must train the same ensemble per fold that cv trains, and
    ``--official-from`` must reproduce cv's own test predictions (and refuse a cv of another configuration)."""
    from mpoxscope.cli import main

    opts = ["--split-file", "none", "--folds", "2", "--preset", "tiny", "--epochs", "1", "--image-size", "96",
            "--ensemble", "tf_efficientnet_lite0", "tf_efficientnet_lite0:1", "--quiet"]
    cv_dir, out = tmp_path / "cv", tmp_path / "protocols"
    assert main(["cv", str(synthetic_root), "--out", str(cv_dir), *opts]) == 0
    assert main(["protocols", str(synthetic_root), "--out", str(out), "--protocols", "official,image-level",
                 "--official-from", str(cv_dir), *opts]) == 0
    report = json.loads((out / "protocols.json").read_text())
    cv_summary = json.loads((cv_dir / "cv_summary.json").read_text())
    official = report["protocols"]["official"]
    assert official["pooled"]["accuracy"]["value"] == pytest.approx(
        cv_summary["uncertainty"]["pooled"]["ci"]["accuracy"]["value"])
    assert official["n_test_per_fold"] == [f["n_images"] for f in cv_summary["per_fold"]]
    assert not (out / "work" / "official").exists()  # read from cv, not trained again
    members = out / "work" / "image-level" / "fold1" / "members"
    assert sorted(p.name for p in members.iterdir()) == ["tf_efficientnet_lite0-seed0", "tf_efficientnet_lite0-seed1"]
    assert report["config"].startswith("ensemble of tf_efficientnet_lite0 (frozen, AGFN head, 96 px, 1 epoch) + "
                                       "tf_efficientnet_lite0:1 (frozen")
    capsys.readouterr()
    other = [o if o != "1" else "2" for o in opts]  # --epochs 2
    assert main(["protocols", str(synthetic_root), "--out", str(tmp_path / "p2"), "--official-from", str(cv_dir),
                 *other]) == 2
    assert "other settings (epochs)" in capsys.readouterr().err


def test_a_finished_protocol_is_reused_by_its_settings_not_its_words(tmp_path):
    """Renaming a configuration in the report must not rerun hours of training; other settings must."""
    data = _tiny_images(tmp_path / "data")
    official = grouped_folds(data, n_folds=3)
    calls: list[int] = []

    def counting(*args):
        calls.append(1)
        return _memorizer(*args)

    def run(name, settings, former=()):
        run_protocols(data, official, "grouped 3-fold", tmp_path / "out", counting, name, ("official",),
                      n_folds=3, log=lambda _: None, settings=settings, former_names=former)
        return len(calls)

    a = {"model": {"backbone": "x"}, "train": {"epochs": 3}}
    assert run("old words", a) == 1
    assert run("new words", a) == 1  # same settings, described differently: reused
    assert run("new words", {"model": {"backbone": "x"}, "train": {"epochs": 4}}) == 2  # another model: rerun
    summary = tmp_path / "out" / "work" / "official.summary.json"
    legacy = {k: v for k, v in json.loads(summary.read_text()).items() if k != "settings"}
    summary.write_text(json.dumps({**legacy, "config": "words of an older version"}))  # written before settings
    assert run("new words", a, former=("words of an older version",)) == 2
    assert run("new words", a) == 3  # neither settings nor known words: run again
    assert run("new words", a) == 3
    # the same settings on another split (here: another split source for the official folds): never reused
    run_protocols(data, official, "split file other.csv", tmp_path / "out", counting, "new words", ("official",),
                  n_folds=3, log=lambda _: None, settings=a)
    assert len(calls) == 4


def test_a_resumed_protocol_says_its_wall_time_is_this_commands_part(tmp_path):
    """A protocol whose runner finds earlier work in its folder (a resumed training) reports only the time this
    command spent: the report must say so rather than pass it off as the whole protocol's time."""
    data = _tiny_images(tmp_path / "data")
    official = grouped_folds(data, n_folds=3)
    out = tmp_path / "out"

    def run() -> dict:
        return run_protocols(data, official, "grouped 3-fold", out, _memorizer, "memorizer", ("official",),
                             n_folds=3, log=lambda _: None, settings={"n": 1})["protocols"]["official"]

    assert run()["resumed"] is False
    md = (out / "protocols.md").read_text()
    assert "official" in md and "resumed" not in md
    (out / "work" / "official.summary.json").unlink()  # as if killed before the summary was written
    (out / "work" / "official" / "fold1").mkdir(parents=True)  # a fold a trainer had started
    assert run()["resumed"] is True
    assert "resumed: this command's part only" in (out / "protocols.md").read_text()
