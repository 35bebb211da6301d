"""Leaks across train/validation/test from a split file, the audit report files, --strict, unreadable files."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageOps

from mpoxscope.audit import (
    AuditConfig,
    audit_dataset,
    cross_split_leaks,
    find_duplicate_pairs,
    leaked_test_indices,
    write_audit,
)
from mpoxscope.cli import main
from mpoxscope.data.samples import load_samples
from mpoxscope.data.splits import folds_from_table, read_split_file
from mpoxscope.data.synthetic import draw_lesion_image

FOLDS = {
    # fold1 leaks: patient MKP_01 in train and test; MKP_04_01 (a byte copy of MKP_02_01, train) and CHP_03_01
    # (a flipped, re-encoded CHP_01_01, train) in test
    "fold1": {"train": ["MKP_01_01.png", "MKP_02_01.png", "CHP_01_01.png", "CHP_02_01.png", "CHP_05_01.jpg"],
              "validation": ["MKP_03_01.png", "CHP_04_01.png"],
              "test": ["MKP_01_02.png", "MKP_04_01.png", "CHP_03_01.png"]},
    "fold2": {"train": ["MKP_01_01.png", "MKP_01_02.png", "MKP_02_01.png", "MKP_04_01.png", "CHP_01_01.png",
                        "CHP_03_01.png", "CHP_05_01.jpg"],
              "validation": ["CHP_02_01.png"],
              "test": ["MKP_03_01.png", "CHP_04_01.png"]},
    # a broken split: one file in train and in test
    "fold3": {"train": ["CHP_02_01.png", "MKP_03_01.png"], "validation": [], "test": ["CHP_02_01.png"]},
}


def write_split(path: Path, folds: list[str]) -> Path:
    rows = [(f, s, name) for f in folds for s, names in FOLDS[f].items() for name in names]
    pd.DataFrame(rows, columns=["fold", "split", "filename"]).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("leaky")
    rng = np.random.default_rng(5)
    (root / "Mpox").mkdir()
    (root / "Chickenpox").mkdir()
    for name in ("MKP_01_01", "MKP_01_02", "MKP_02_01", "MKP_03_01"):
        draw_lesion_image("Mpox", rng, 128).save(root / "Mpox" / f"{name}.png")
    for name in ("CHP_01_01", "CHP_02_01", "CHP_04_01"):
        draw_lesion_image("Chickenpox", rng, 128).save(root / "Chickenpox" / f"{name}.png")
    shutil.copy(root / "Mpox" / "MKP_02_01.png", root / "Mpox" / "MKP_04_01.png")
    buf = io.BytesIO()
    ImageOps.mirror(Image.open(root / "Chickenpox" / "CHP_01_01.png").convert("RGB")).save(buf, "JPEG", quality=50)
    Image.open(buf).save(root / "Chickenpox" / "CHP_03_01.png")
    (root / "Chickenpox" / "CHP_05_01.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    (root / "Chickenpox" / "CHP_06_01.png").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def split_csv(dataset, tmp_path_factory) -> Path:
    return write_split(tmp_path_factory.mktemp("split") / "split.csv", ["fold1", "fold2", "fold3"])


def names(data, indices) -> set[str]:
    return {data.samples[i].filename for i in indices}


def test_cross_split_leaks_per_fold(dataset, split_csv):
    data = load_samples(dataset)
    folds = folds_from_table(data, read_split_file(split_csv), check_groups=False)
    pairs = find_duplicate_pairs(data)
    kinds = {frozenset(names(data, (p.a, p.b))): p.kind for p in pairs}
    assert kinds == {frozenset({"MKP_02_01.png", "MKP_04_01.png"}): "identical-file",
                     frozenset({"CHP_01_01.png", "CHP_03_01.png"}): "near"}

    f1, f2, f3 = (cross_split_leaks(data, f, pairs) for f in folds)
    assert [(p.patient, p.splits) for p in f1.patient_leaks] == [("MKP_01", ["train", "test"])]
    assert {frozenset(names(data, (d.pair.a, d.pair.b))) for d in f1.duplicate_leaks} == set(kinds)
    assert all({d.split_a, d.split_b} == {"train", "test"} and not d.same_patient for d in f1.duplicate_leaks)
    assert names(data, f1.leaked_test) == {"MKP_01_02.png", "MKP_04_01.png", "CHP_03_01.png"}
    assert names(data, leaked_test_indices(data, folds[0], pairs)) == names(data, f1.leaked_test)

    assert not f2.has_leaks and f2.leaked_test == []
    assert f2.sizes == {"train": 7, "validation": 1, "test": 2}
    assert [(p.patient, p.splits) for p in f3.patient_leaks] == [("CHP_02", ["train", "test"])]
    assert names(data, f3.leaked_test) == {"CHP_02_01.png"}


def test_leaked_test_indices_without_duplicates_uses_patients_only(dataset, split_csv):
    data = load_samples(dataset)
    fold1 = folds_from_table(data, read_split_file(split_csv), check_groups=False)[0]
    assert names(data, leaked_test_indices(data, fold1, [])) == {"MKP_01_02.png"}


def test_report_lists_unreadable_file_and_is_json(dataset, split_csv, tmp_path):
    data = load_samples(dataset)
    report = audit_dataset(data, read_split_file(split_csv), AuditConfig(), str(split_csv))
    assert [u.file for u in report.unreadable] == ["Chickenpox/CHP_05_01.jpg", "Chickenpox/CHP_06_01.png"]
    assert report.unreadable[0].reason.startswith("cannot decode image") and report.unreadable[1].reason == "empty file"
    by_class = {c.name: (c.images, c.patients, c.unreadable) for c in report.classes}
    assert by_class == {"Mpox": (5, 4, 0), "Chickenpox": (6, 6, 2)}
    assert report.has_leaks
    paths = write_audit(report, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["audit.html", "audit.json", "audit.md"]
    d = json.loads(paths["json"].read_text())
    assert d["summary"]["images"] == 11 and d["summary"]["unreadable"] == 2
    assert d["summary"]["leaks"]["fold1"] == {"patients": 1, "duplicate_pairs": 2, "cross_patient_duplicate_pairs": 2,
                                              "leaked_test_images": 3}
    assert d["modes"] == {"RGB": 9} and d["image_sizes"] == {"128x128": 9}
    html = paths["html"].read_text()
    assert html.count("data:image/jpeg;base64,") == 4  # two pairs, two thumbnails each; no image file copied
    assert "crosses fold1: train/test" in html
    md = paths["markdown"].read_text()
    assert "patient `MKP_01` in train and test" in md and "CHP_06_01.png | Chickenpox | empty file" in md


def test_cli_strict_exit_codes(dataset, split_csv, tmp_path, capsys):
    out = tmp_path / "audit"
    assert main(["audit", str(dataset), "--split-file", str(split_csv), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(dataset) in printed and str(split_csv) in printed and str(out / "audit.json") in printed
    assert "fold1 (5/2/3): 1 patient leaks, 2 duplicate leaks" in printed
    assert main(["audit", str(dataset), "--split-file", str(split_csv), "--out", str(out), "--strict"]) == 1
    clean = write_split(tmp_path / "clean.csv", ["fold2"])
    assert main(["audit", str(dataset), "--split-file", str(clean), "--out", str(out), "--strict"]) == 0
    assert main(["audit", str(dataset), "--no-split", "--out", str(out), "--strict"]) == 0


def test_cli_finds_split_file_beside_the_data(dataset, tmp_path, capsys):
    data_copy = tmp_path / "data"
    shutil.copytree(dataset, data_copy)
    write_split(data_copy / "folds.csv", ["fold1"])
    assert main(["audit", str(data_copy), "--out", str(tmp_path / "out"), "--strict"]) == 1
    assert f"split file: {data_copy / 'folds.csv'} (1 folds)" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--threshold", "99"], "--threshold: must be between 0 and 64"),
    (["--split-file", "missing.csv"], "missing.csv: split file not found"),
])
def test_cli_user_errors_are_one_line(dataset, tmp_path, capsys, extra, message):
    assert main(["audit", str(dataset), "--out", str(tmp_path), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
