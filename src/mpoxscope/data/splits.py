"""Train/validation/test splits: official split files, or patient-grouped stratified k-fold."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from mpoxscope.data.samples import SampleSet, refuse_empty_cells
from mpoxscope.errors import MpoxscopeError

SPLITS = ("train", "validation", "test")
_SPLIT_ALIASES = {"train": "train", "training": "train", "valid": "validation", "validation": "validation",
                  "val": "validation", "test": "test", "testing": "test"}


@dataclass(frozen=True)
class Fold:
    """Indices into a :class:`SampleSet` for one fold."""

    name: str
    train: tuple[int, ...]
    validation: tuple[int, ...]
    test: tuple[int, ...]

    def indices(self, split: str) -> tuple[int, ...]:
        if split not in SPLITS:
            raise MpoxscopeError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        return getattr(self, split)


def read_split_file(path: str | os.PathLike) -> pd.DataFrame:
    """Read a split file into a table with columns ``fold, split, filename``.

    Accepts the MSLD ``datalog.xlsx`` (one sheet per fold, columns train/validation/test holding file names) and a
    CSV with columns ``fold,split,filename[,class]``.
    """
    path = Path(path)
    if not path.is_file():
        raise MpoxscopeError(f"{path}: split file not found")
    _check_size(path)
    if path.suffix.lower() in (".xlsx", ".xls"):
        try:
            sheets = pd.read_excel(path, sheet_name=None)
        except Exception as e:  # openpyxl raises many types for a corrupt workbook
            raise MpoxscopeError(f"{path}: not a readable Excel file ({e})") from None
        rows = []
        for i, (_, sheet) in enumerate(sheets.items(), start=1):
            cols = {_SPLIT_ALIASES.get(str(c).strip().lower()): c for c in sheet.columns}
            if not {"train", "test"} <= set(cols):
                raise MpoxscopeError(f"{path}: sheet {i} needs columns train, validation, test")
            for split in SPLITS:
                if split in cols:
                    for name in sheet[cols[split]].dropna():
                        rows.append({"fold": f"fold{i}", "split": split, "filename": Path(str(name)).name})
        table = pd.DataFrame(rows, columns=["fold", "split", "filename"])
    else:
        try:
            table = pd.read_csv(path, dtype={"fold": str})  # "1" stays "1", never 1.0
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
            raise MpoxscopeError(f"{path}: not a readable CSV ({e})") from None
        missing = {"fold", "split", "filename"} - set(table.columns)
        if missing:
            raise MpoxscopeError(f"{path}: split CSV is missing column(s) {', '.join(sorted(missing))}")
        refuse_empty_cells(path, table, ("fold",))
        table = table.assign(
            fold=table["fold"].str.strip().map(lambda f: f"fold{f}" if f.isdigit() else f),  # --fold 1 finds it
            split=table["split"].astype(str).str.strip().str.lower().map(_SPLIT_ALIASES),
            filename=table["filename"].map(lambda f: Path(str(f)).name),
        )
        if table["split"].isna().any():
            raise MpoxscopeError(f"{path}: column 'split' must hold train, validation or test")
    if table.empty:
        raise MpoxscopeError(f"{path}: split file lists no images")
    return table


#: Largest split file read (a CSV's bytes, a workbook's uncompressed bytes): MSLD's datalog.xlsx is ~30 KB.
MAX_SPLIT_BYTES = 64 * 2**20


def _check_size(path: Path) -> None:
    """Refuse a split file too large to be one, before pandas reads it (an .xlsx is a zip: a zip bomb inflates)."""
    import zipfile

    size = path.stat().st_size
    if path.suffix.lower() == ".xlsx" and zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                size = sum(i.file_size for i in z.infolist())
        except (zipfile.BadZipFile, OSError) as e:
            raise MpoxscopeError(f"{path}: not a readable Excel file ({e})") from None
    if size > MAX_SPLIT_BYTES:
        raise MpoxscopeError(f"{path}: {size / 2**20:.0f} MiB (uncompressed) is too large for a split file "
                             f"(limit {MAX_SPLIT_BYTES // 2**20} MiB)")


def find_split_file(root: str | os.PathLike) -> Path | None:
    """The split file shipped beside a dataset (``folds.csv`` or ``datalog.xlsx``), if any.

    Given the ``images`` folder of the ``DATA/images/<class>/`` layout, the split file one level up (in ``DATA``)
    is found too, so pointing at either folder gives the same official split."""
    root = Path(root)
    for name in ("folds.csv", "datalog.xlsx"):
        for candidate in (root / name, *root.glob(f"*/{name}")):
            if candidate.is_file():
                return candidate
    if root.name.lower() == "images":
        for name in ("folds.csv", "datalog.xlsx"):
            if (root.parent / name).is_file():
                return root.parent / name
    return None


def folds_from_table(
    data: SampleSet, table: pd.DataFrame, source: str = "split file", check_groups: bool = True
) -> list[Fold]:
    """Turn a split table into folds of indices into ``data``; every file it names must exist.

    With ``check_groups`` (the default, for training) a patient in two of train/validation/test is an error;
    the audit passes ``False`` to report such leaks instead."""
    index = data.by_filename()
    unknown = sorted(set(table["filename"]) - set(index))
    if unknown:
        more = f" (and {len(unknown) - 3} more)" if len(unknown) > 3 else ""
        raise MpoxscopeError(f"{source}: {len(unknown)} file(s) not in the dataset, e.g. "
                             f"{', '.join(unknown[:3])}{more}")
    folds = []
    for name in sorted(table["fold"].unique(), key=_natural_key):
        part = table[table["fold"] == name]
        # listed twice in one part, an image would be trained on or scored twice (in two parts of a fold it is a
        # leak: check_disjoint refuses it for training, the audit reports it)
        repeated = part["filename"][part.duplicated(["split", "filename"])]
        if len(repeated):
            raise MpoxscopeError(f"{source}: fold {name} lists {repeated.iloc[0]} more than once in one part"
                                 + (f" (and {len(repeated) - 1} more repeats)" if len(repeated) > 1 else ""))
        by_split = {s: tuple(sorted(index[f] for f in part.loc[part["split"] == s, "filename"])) for s in SPLITS}
        fold = Fold(str(name), by_split["train"], by_split["validation"], by_split["test"])
        if check_groups:
            check_disjoint(data, fold, source)
        folds.append(fold)
    return folds


def grouped_folds(data: SampleSet, n_folds: int = 5, val_folds: int = 4, seed: int = 0) -> list[Fold]:
    """Patient-grouped stratified k-fold: each fold tests on 1/k of the patients, and a validation part
    (about 1/``val_folds`` of the rest, again grouped) is carved out of the training part."""
    if n_folds < 2:
        raise MpoxscopeError("--folds must be at least 2")
    y = np.asarray(data.targets)
    groups = np.asarray(data.groups)
    n_groups = len(set(groups))
    if n_groups < n_folds:
        raise MpoxscopeError(f"only {n_groups} patient groups: cannot make {n_folds} folds")
    outer = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    folds = []
    for k, (trainval, test) in enumerate(outer.split(np.zeros(len(y)), y, groups), start=1):
        inner = StratifiedGroupKFold(n_splits=val_folds, shuffle=True, random_state=seed + k)
        tr, va = next(inner.split(np.zeros(len(trainval)), y[trainval], groups[trainval]))
        fold = Fold(f"fold{k}", tuple(sorted(trainval[tr].tolist())), tuple(sorted(trainval[va].tolist())),
                    tuple(sorted(test.tolist())))
        check_disjoint(data, fold, "grouped k-fold")
        folds.append(fold)
    return folds


def check_disjoint(data: SampleSet, fold: Fold, source: str) -> None:
    """Refuse a fold in which an image or a patient appears in two of train/validation/test."""
    parts = {s: set(fold.indices(s)) for s in SPLITS}
    for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
        shared = parts[a] & parts[b]
        if shared:
            f = data.samples[min(shared)].filename
            raise MpoxscopeError(f"{source}, {fold.name}: {f} is in both {a} and {b}")
        ga = {data.samples[i].group for i in parts[a]}
        gb = {data.samples[i].group for i in parts[b]}
        if ga & gb:
            raise MpoxscopeError(f"{source}, {fold.name}: patient {sorted(ga & gb)[0]} is in both {a} and {b}")


def select_fold(folds: list[Fold], fold: str | int) -> Fold:
    """A fold by name (``fold1``) or 1-based number."""
    key = f"fold{fold}" if str(fold).isdigit() else str(fold)
    for f in folds:
        if f.name == key:
            return f
    raise MpoxscopeError(f"fold {fold!r} not found; available: {', '.join(f.name for f in folds)}")


def _natural_key(name: str) -> tuple:
    digits = "".join(ch for ch in str(name) if ch.isdigit())
    return (int(digits) if digits else 0, str(name))
