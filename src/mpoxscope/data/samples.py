"""Find the images of a dataset on disk: a folder per class, or the MSLD v2.0 download as distributed (each
layout one entry of :data:`mpoxscope.registry.LAYOUTS`)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from mpoxscope.data.classes import canonical_class, sort_classes
from mpoxscope.data.images import is_image_file
from mpoxscope.errors import MpoxscopeError
from mpoxscope.registry import LAYOUTS, LayoutSpec, register_layout

#: MSLD file names are ``DiseaseCode_PatientNumber_ImageNumber`` (e.g. ``MKP_17_01.jpg``).
_MSLD_NAME = re.compile(r"^(?P<code>[A-Za-z]+)_(?P<patient>\d+)_(?P<image>\d+)$")

#: Environment variable that points at the real MSLD v2.0 folder.
MSLD_ENV = "MPOXSCOPE_MSLD"
MSLD_DEFAULT = "../shared/data/msld_v2"


def msld_root() -> Path:
    """Where MSLD v2.0 lives: ``$MPOXSCOPE_MSLD``, else ``../shared/data/msld_v2``."""
    return Path(os.environ.get(MSLD_ENV, MSLD_DEFAULT))


@dataclass(frozen=True)
class Sample:
    """One image: its path, canonical class name and the group (patient) it belongs to."""

    path: Path
    label: str
    group: str

    @property
    def filename(self) -> str:
        return self.path.name


@dataclass
class SampleSet:
    """An ordered list of samples plus the class vocabulary (index = position in ``classes``)."""

    samples: list[Sample]
    classes: list[str]
    root: Path | None = None
    #: Split table found alongside the data (the MSLD ``FOLDS`` folders), if any.
    folder_splits: pd.DataFrame | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def targets(self) -> list[int]:
        index = {c: i for i, c in enumerate(self.classes)}
        return [index[s.label] for s in self.samples]

    @property
    def groups(self) -> list[str]:
        return [s.group for s in self.samples]

    def by_filename(self) -> dict[str, int]:
        return {s.filename: i for i, s in enumerate(self.samples)}

    def subset(self, indices: list[int]) -> SampleSet:
        return SampleSet([self.samples[i] for i in indices], list(self.classes), self.root)


def patient_group(filename: str) -> str | None:
    """The patient of an MSLD-style file name (``MKP_17_01.jpg`` -> ``MKP_17``), or ``None``."""
    m = _MSLD_NAME.match(Path(filename).stem)
    if m is None:
        return None
    return f"{m['code'].upper()}_{int(m['patient']):02d}"


def _group_for(path: Path, groups: dict[str, str] | None) -> str:
    if groups is not None and path.name in groups:
        return str(groups[path.name])
    return patient_group(path.name) or path.name  # no patient known: the image is its own group


def read_groups_csv(path: str | os.PathLike) -> dict[str, str]:
    """Read a ``filename,group`` CSV (a ``patient`` column is accepted for ``group``)."""
    df = _read_csv(path)
    group_col = "group" if "group" in df.columns else "patient" if "patient" in df.columns else None
    if "filename" not in df.columns or group_col is None:
        raise MpoxscopeError(f"{path}: groups CSV needs columns 'filename' and 'group' (got {list(df.columns)})")
    refuse_empty_cells(path, df, (group_col, "filename"))  # "nan" would become one patient
    groups: dict[str, str] = {}
    for f, g in zip(df["filename"], df[group_col]):
        name = Path(str(f)).name
        if groups.setdefault(name, str(g)) != str(g):
            raise MpoxscopeError(f"{path}: {name} is given two groups ({groups[name]} and {g})")
    return groups


def refuse_empty_cells(path: str | os.PathLike, df: pd.DataFrame, columns: tuple[str, ...]) -> None:
    """One line naming the file, the column and the line of its first empty cell, if any (pandas reads an empty
    cell as NaN, which ``str()`` would turn into a value "nan")."""
    for column in columns:
        if df[column].isna().any():
            line = int(df[column].isna().idxmax()) + 2  # 1-based, after the header line
            raise MpoxscopeError(f"{path}: column {column!r} has an empty cell (line {line})")


#: Largest groups CSV read (a folder of a million images fits in a few tens of MiB); bounds pandas' memory.
MAX_CSV_BYTES = 64 * 2**20


def _read_csv(path: str | os.PathLike) -> pd.DataFrame:
    p = Path(path)
    if not p.is_file():  # a folder, a device such as /dev/zero, a FIFO: refused before pandas reads anything
        raise MpoxscopeError(f"{path}: file not found" if not p.exists() else f"{path}: not a regular file")
    if p.stat().st_size > MAX_CSV_BYTES:
        raise MpoxscopeError(f"{path}: {p.stat().st_size / 2**20:.0f} MiB is too large for a groups CSV "
                             f"(limit {MAX_CSV_BYTES // 2**20} MiB)")
    try:
        return pd.read_csv(p)
    except OSError as e:
        raise MpoxscopeError(f"{path}: cannot read ({e.strerror or e})") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise MpoxscopeError(f"{path}: not a readable CSV ({e})") from None


def _class_dirs(root: Path) -> list[Path]:
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _find_folds_dir(root: Path) -> Path | None:
    for depth_glob in ("FOLDS", "*/FOLDS", "*/*/FOLDS", "*/*/*/FOLDS"):
        hits = sorted(p for p in root.glob(depth_glob) if p.is_dir())
        if hits:
            return hits[0]
    return None


def _scan_class_folders(root: Path, groups: dict[str, str] | None) -> list[Sample]:
    samples = []
    for d in _class_dirs(root):
        label = canonical_class(d.name)
        for f in sorted(d.rglob("*")):
            # hidden files and folders (._x.jpg, .thumbnails/) are never samples
            if f.is_file() and is_image_file(f) and not any(part.startswith(".") for part in f.relative_to(d).parts):
                samples.append(Sample(f, label, _group_for(f, groups)))
    return samples


def _scan_msld_folds(folds_dir: Path, groups: dict[str, str] | None) -> tuple[list[Sample], pd.DataFrame]:
    """Read ``FOLDS/fold*/{Train,Valid,Test}/<class>/``: each image once, plus the split table."""
    split_names = {"train": "train", "valid": "validation", "validation": "validation", "val": "validation",
                   "test": "test"}
    first: dict[str, Sample] = {}
    rows = []
    for fold_dir in sorted(p for p in folds_dir.iterdir() if p.is_dir()):
        for split_dir in sorted(p for p in fold_dir.iterdir() if p.is_dir()):
            split = split_names.get(split_dir.name.lower())
            if split is None:
                continue
            for class_dir in _class_dirs(split_dir):
                label = canonical_class(class_dir.name)
                for f in sorted(class_dir.iterdir()):
                    if f.is_file() and is_image_file(f):
                        first.setdefault(f.name, Sample(f, label, _group_for(f, groups)))
                        rows.append({"fold": fold_dir.name, "split": split, "filename": f.name, "class": label})
    return sorted(first.values(), key=lambda s: (s.label, s.filename)), pd.DataFrame(rows)


# ----- the layouts (see mpoxscope.registry.LAYOUTS; tried last-registered first, so the generic one is last) --

def _has_class_folders(root: Path) -> bool:
    return bool(_class_dirs(root))


@register_layout("class-folders", "ROOT/<class>/ (any depth below each class folder)", _has_class_folders)
def _scan_root_class_folders(root: Path, groups: dict[str, str] | None) -> list[Sample]:
    return _scan_class_folders(root, groups)


@register_layout("msld-download", "the MSLD v2.0 download: .../FOLDS/fold1..5/{Train,Valid,Test}/<class>/ (each "
                                  "file once; the folders kept as the split table)",
                 lambda root: _find_folds_dir(root) is not None)
def _scan_msld_download(root: Path, groups: dict[str, str] | None) -> tuple[list[Sample], pd.DataFrame]:
    folds_dir = _find_folds_dir(root)
    assert folds_dir is not None
    return _scan_msld_folds(folds_dir, groups)


@register_layout("images-folder", "ROOT/images/<class>/ (the layout in ../shared)",
                 lambda root: (root / "images").is_dir())
def _scan_images_folder(root: Path, groups: dict[str, str] | None) -> list[Sample]:
    return _scan_class_folders(root / "images", groups)


def detect_layout(root: str | os.PathLike) -> LayoutSpec:
    """The layout of ``root``: the last-registered one whose ``detect`` accepts it."""
    root = Path(root)
    for _, spec in reversed(LAYOUTS.items()):
        if spec.detect(root):
            return spec
    raise MpoxscopeError(f"{root}: no images found (expected one sub-folder per class)")


def load_samples(root: str | os.PathLike, groups_csv: str | os.PathLike | None = None) -> SampleSet:
    """Find every image under ``root`` with its class and patient group.

    The layout is detected (:func:`detect_layout`): ``root/images/<class>/`` (the layout in ``../shared``), the
    MSLD v2.0 download (``.../FOLDS/fold1..5/{Train,Valid,Test}/<class>/``; each file once, the folders kept as
    the split table), ``root/<class>/``, or any layout registered with
    :func:`mpoxscope.registry.register_layout`. Class names are canonicalised (``Monkeypox`` -> ``Mpox``).
    """
    root = Path(root)
    if not root.is_dir():
        raise MpoxscopeError(f"{root}: data folder not found")
    groups = read_groups_csv(groups_csv) if groups_csv else None
    scanned = detect_layout(root).scan(root, groups)
    samples, folder_splits = scanned if isinstance(scanned, tuple) else (scanned, None)
    if not samples:
        raise MpoxscopeError(f"{root}: no images found (expected one sub-folder per class)")
    names = [s.filename for s in samples]
    if groups is not None and not set(groups) & set(names):  # e.g. stems without extensions: silently ungrouped
        raise MpoxscopeError(f"{groups_csv}: no file name in it matches an image under {root} (e.g. "
                             f"{next(iter(groups))!r}; give names with extensions, as {names[0]!r})")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise MpoxscopeError(f"{root}: file name {dup!r} appears in more than one class folder")
    classes = sort_classes({s.label for s in samples})
    if len(classes) < 2:
        raise MpoxscopeError(f"{root}: need at least two class folders, found {classes}")
    return SampleSet(samples, classes, root, folder_splits)


def samples_from_paths(paths: list[Path], label: str = "?") -> SampleSet:
    """Unlabelled images (for prediction)."""
    return SampleSet([Sample(Path(p), label, Path(p).name) for p in paths], [label])
