"""Data layer: class names, folder layouts, patient groups, split files, grouped folds, robust image loading."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mpoxscope.data.classes import canonical_class, sort_classes
from mpoxscope.data.images import MAX_PIXELS, decode_image, load_image
from mpoxscope.data.protocol import resolve_folds
from mpoxscope.data.samples import load_samples, patient_group
from mpoxscope.data.splits import folds_from_table, grouped_folds, read_split_file, select_fold
from mpoxscope.errors import ImageError, MpoxscopeError


@pytest.mark.parametrize("name,expected", [
    ("Monkeypox", "Mpox"), ("MKP", "Mpox"), ("mpox", "Mpox"), ("Hand, foot and mouth disease", "HFMD"),
    ("Normal", "Healthy"), ("chickenpox", "Chickenpox"), ("Measles", "Measles"), ("Cowpox", "Cowpox"),
    ("Psoriasis", "Psoriasis"),
])
def test_canonical_class(name, expected):
    assert canonical_class(name) == expected


def test_sort_classes_known_first():
    assert sort_classes({"Zeta", "Healthy", "Mpox", "Acne"}) == ["Mpox", "Healthy", "Acne", "Zeta"]


def test_patient_group():
    assert patient_group("MKP_17_01.jpg") == "MKP_17"
    assert patient_group("HEALTHY_5_2.png") == "HEALTHY_05"
    assert patient_group("random.jpg") is None


def _write(path, size=(40, 30), color=(200, 100, 50), mode="RGB", fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color if mode == "RGB" else 128).save(path, format=fmt)
    return path


def test_folder_layout_with_aliases(tmp_path):
    for cls in ("Monkeypox", "Normal", "Hand, foot and mouth disease"):
        for p in (1, 2):
            _write(tmp_path / cls / f"X{cls[:2].upper()}_{p}_1.png")
    (tmp_path / "Normal" / "notes.txt").write_text("not an image")
    data = load_samples(tmp_path)
    assert data.classes == ["Mpox", "HFMD", "Healthy"]
    assert len(data) == 6
    assert all(s.group.startswith("X") for s in data.samples)


def test_msld_download_layout(tmp_path):
    base = tmp_path / "Original Images" / "Original Images" / "FOLDS"
    for fold in ("fold1", "fold2"):
        for split, names in (("Train", ["MKP_01_01", "CHP_01_01"]), ("Valid", ["MKP_02_01", "CHP_02_01"]),
                             ("Test", ["MKP_03_01", "CHP_03_01"])):
            for n in names:
                cls = "Monkeypox" if n.startswith("MKP") else "Chickenpox"
                _write(base / fold / split / cls / f"{n}.jpg")
    data = load_samples(tmp_path)
    assert len(data) == 6  # each image once, though it is stored in every fold
    assert data.classes == ["Mpox", "Chickenpox"]
    folds, source = resolve_folds(data, "auto")
    assert source == "official FOLDS folders"
    assert [f.name for f in folds] == ["fold1", "fold2"]
    assert {data.samples[i].filename for i in folds[0].test} == {"MKP_03_01.jpg", "CHP_03_01.jpg"}


def test_split_csv_and_patient_leak_refused(tmp_path):
    for n in ("MKP_01_01", "MKP_01_02", "MKP_02_01", "CHP_01_01", "CHP_02_01", "CHP_03_01"):
        _write(tmp_path / ("Mpox" if n.startswith("MKP") else "Chickenpox") / f"{n}.jpg")
    data = load_samples(tmp_path)
    rows = [("f1", "train", "MKP_01_01.jpg"), ("f1", "train", "CHP_01_01.jpg"), ("f1", "validation", "CHP_02_01.jpg"),
            ("f1", "test", "MKP_02_01.jpg"), ("f1", "test", "CHP_03_01.jpg"), ("f1", "valid", "MKP_01_02.jpg")]
    csv = tmp_path / "split.csv"
    pd.DataFrame(rows, columns=["fold", "split", "filename"]).to_csv(csv, index=False)
    table = read_split_file(csv)
    assert set(table["split"]) == {"train", "validation", "test"}
    with pytest.raises(MpoxscopeError, match="patient MKP_01 is in both train and validation"):
        folds_from_table(data, table)
    folds = folds_from_table(data, table, check_groups=False)  # the audit reports instead of refusing
    assert len(folds[0].validation) == 2


def test_split_file_unknown_files_and_bad_columns(tmp_path, synthetic_root):
    data = load_samples(synthetic_root)
    bad = tmp_path / "bad.csv"
    bad.write_text("fold,part,name\n1,train,a.jpg\n")
    with pytest.raises(MpoxscopeError, match="missing column"):
        read_split_file(bad)
    unknown = tmp_path / "unknown.csv"
    unknown.write_text("fold,split,filename\n1,train,nothere.jpg\n")
    with pytest.raises(MpoxscopeError, match="not in the dataset"):
        folds_from_table(data, read_split_file(unknown))
    name = data.samples[0].path.name
    numeric = tmp_path / "numeric.csv"  # fold "1" is fold1 (as --fold 1 asks for), not "1" or "1.0"
    numeric.write_text(f"fold,split,filename\n1,train,{name}\n")
    assert [f.name for f in folds_from_table(data, read_split_file(numeric), check_groups=False)] == ["fold1"]
    blank = tmp_path / "blank.csv"
    blank.write_text(f"fold,split,filename\n1,train,{name}\n,test,{name}\n")
    with pytest.raises(MpoxscopeError, match="empty cell \\(line 3\\)"):
        read_split_file(blank)
    twice = tmp_path / "twice.csv"  # the same image twice would be scored twice
    twice.write_text(f"fold,split,filename\nfold1,test,{name}\nfold1,test,{name}\n")
    with pytest.raises(MpoxscopeError, match=f"fold fold1 lists {name} more than once"):
        folds_from_table(data, read_split_file(twice), check_groups=False)


def test_a_split_file_too_large_to_be_one_is_refused_before_pandas_reads_it(tmp_path, monkeypatch):
    import zipfile

    from mpoxscope.data import splits

    monkeypatch.setattr(splits, "MAX_SPLIT_BYTES", 1000)
    big = tmp_path / "big.csv"
    big.write_text("fold,split,filename\n" + "fold1,train,a.jpg\n" * 100)
    with pytest.raises(MpoxscopeError, match="too large for a split file"):
        read_split_file(big)
    bomb = tmp_path / "datalog.xlsx"  # small on disk, large once inflated
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("xl/worksheets/sheet1.xml", "0" * 100_000)
    assert bomb.stat().st_size < 1000
    with pytest.raises(MpoxscopeError, match="MiB \\(uncompressed\\) is too large"):
        read_split_file(bomb)


def test_grouped_folds_are_patient_disjoint_stratified_and_seeded(synthetic_root):
    data = load_samples(synthetic_root)
    folds = grouped_folds(data, n_folds=3, seed=1)
    assert folds == grouped_folds(data, n_folds=3, seed=1)
    assert folds != grouped_folds(data, n_folds=3, seed=2)
    all_test = sorted(i for f in folds for i in f.test)
    assert all_test == list(range(len(data)))  # the test parts partition the data
    for f in folds:
        groups = {s: {data.samples[i].group for i in f.indices(s)} for s in ("train", "validation", "test")}
        assert not groups["train"] & groups["test"] and not groups["train"] & groups["validation"]
        assert not groups["validation"] & groups["test"]
        assert {data.samples[i].label for i in f.test} == set(data.classes)  # every class in every test part
    assert select_fold(folds, 2).name == "fold2"
    with pytest.raises(MpoxscopeError, match="not found"):
        select_fold(folds, 9)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16", "LA", "I", "F"])
def test_any_mode_to_rgb(tmp_path, mode):
    img = Image.new(mode, (20, 10))
    if mode == "I;16":
        img = Image.fromarray(np.arange(200, dtype=np.uint16).reshape(10, 20) * 300)
    fmt = "TIFF" if mode in ("CMYK", "I", "F") else "PNG"
    path = tmp_path / f"x.{fmt.lower()}"
    img.save(path, format=fmt)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (20, 10)


def test_exif_orientation_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif)
    assert load_image(path).size == (20, 40)


def test_bad_files_raise_one_line_errors(tmp_path):
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"this is not an image")
    with pytest.raises(ImageError, match="junk.jpg: not a supported image format"):
        load_image(junk)
    buf = io.BytesIO()
    Image.new("RGB", (200, 200), (1, 2, 3)).save(buf, format="JPEG")
    trunc = tmp_path / "trunc.jpg"
    trunc.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match="trunc.jpg: cannot decode"):
        load_image(trunc)
    with pytest.raises(ImageError, match="file not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="empty file"):
        decode_image(b"", "upload.png")


def test_decompression_bomb_refused():
    side = int(MAX_PIXELS ** 0.5) + 100
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, format="PNG")  # tiny file, huge canvas
    with pytest.raises(ImageError, match="too large"):
        decode_image(buf.getvalue(), "bomb.png")


def test_transforms_shapes_and_determinism():
    import torch

    from mpoxscope.data.transforms import eval_transform, train_transform

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 200, 3), dtype=np.uint8))
    ev = eval_transform(96)
    a, b = ev(img), ev(img)
    assert a.shape == (3, 96, 96) and torch.equal(a, b)  # no randomness at evaluation
    tr = train_transform(96)
    torch.manual_seed(0)
    x = tr(img)
    torch.manual_seed(0)
    assert torch.equal(x, tr(img))  # seeded: cached views are reproducible
    assert x.shape == (3, 96, 96) and x.dtype == torch.float32
    assert not torch.equal(tr(img), tr(img))


def test_runs_record_the_split_file_that_rebuilds_their_folds(tmp_path, synthetic_root):
    """``auto`` is recorded as the file it found (or ``none``/k for the grouped k-fold), so evaluate and ensemble
    rebuild the training folds by default, not whatever ``auto`` finds later."""
    from mpoxscope.config import DataConfig
    from mpoxscope.engine.runner import prepare, recorded_split

    data = load_samples(synthetic_root)
    fold = grouped_folds(data, 3)[0]
    csv = tmp_path / "elsewhere" / "split.csv"  # not beside the data: 'auto' would never find it
    csv.parent.mkdir()
    pd.DataFrame([("fold1", s, data.samples[i].filename) for s in ("train", "validation", "test")
                  for i in fold.indices(s)], columns=["fold", "split", "filename"]).to_csv(csv, index=False)
    info = prepare(DataConfig(root=str(synthetic_root), split_file=str(csv))).info(fold)
    assert (info["split_file"], info["split_source"]) == (str(csv.resolve()), "split file split.csv")
    assert recorded_split(info) == (str(csv.resolve()), 5)
    grouped = prepare(DataConfig(root=str(synthetic_root), split_file="none", folds=3))
    assert recorded_split(grouped.info(grouped.folds[0])) == ("none", 3)
    csv.unlink()  # a moved or deleted split file: back to what 'auto' finds
    assert recorded_split(info) == ("auto", 5) and recorded_split({}) == ("auto", 5)


def test_groups_csv_that_matches_nothing_or_is_ambiguous_is_refused(tmp_path, synthetic_root):
    """A groups CSV that silently grouped nothing would let one patient sit in train and test."""
    names = [s.filename for s in load_samples(synthetic_root).samples]
    good = tmp_path / "good.csv"
    good.write_text("filename,group\n" + "".join(f"{n},P{i // 2}\n" for i, n in enumerate(names)))
    assert load_samples(synthetic_root, good).samples[0].group == "P0"
    stems = tmp_path / "stems.csv"
    stems.write_text("filename,group\n" + "".join(f"{n.rsplit('.', 1)[0]},P{i}\n" for i, n in enumerate(names)))
    with pytest.raises(MpoxscopeError, match="no file name in it matches an image"):
        load_samples(synthetic_root, stems)
    blank = tmp_path / "blank.csv"
    blank.write_text(f"filename,group\n{names[0]},P1\n{names[1]},\n")
    with pytest.raises(MpoxscopeError, match="column 'group' has an empty cell \\(line 3\\)"):
        load_samples(synthetic_root, blank)
    twice = tmp_path / "twice.csv"
    twice.write_text(f"filename,group\n{names[0]},P1\n{names[0]},P2\n")
    with pytest.raises(MpoxscopeError, match="given two groups"):
        load_samples(synthetic_root, twice)
