"""Which folds a dataset is evaluated on, and a one-line name for that protocol."""

from __future__ import annotations

from pathlib import Path

from mpoxscope.data.samples import SampleSet
from mpoxscope.data.splits import Fold, find_split_file, folds_from_table, grouped_folds, read_split_file


def resolve_folds(data: SampleSet, split_file: str | Path | None = "auto", n_folds: int = 5,
                  seed: int = 0) -> tuple[list[Fold], str]:
    """Folds for ``data`` and a description of where they came from.

    ``split_file``: a path (``.xlsx`` or ``.csv``); ``"auto"`` uses a split file found beside the data (or the
    MSLD ``FOLDS`` folders), falling back to patient-grouped stratified k-fold; ``None``/``"none"`` forces the
    grouped k-fold.
    """
    if split_file in (None, "none"):
        return grouped_folds(data, n_folds, seed=seed), f"grouped stratified {n_folds}-fold (seed {seed})"
    if split_file == "auto":
        found = _split_file_beside(data)
        if found is not None:
            return folds_from_table(data, read_split_file(found), str(found)), f"split file {found.name}"
        if data.folder_splits is not None and not data.folder_splits.empty:
            return folds_from_table(data, data.folder_splits, "FOLDS folders"), "official FOLDS folders"
        return grouped_folds(data, n_folds, seed=seed), f"grouped stratified {n_folds}-fold (seed {seed})"
    path = Path(split_file)
    return folds_from_table(data, read_split_file(path), str(path)), f"split file {path.name}"


def split_request(data: SampleSet, split_file: str | Path | None) -> str:
    """The ``split_file`` value that rebuilds the folds :func:`resolve_folds` makes from ``split_file``: ``auto``
    resolved to the file it finds (absolute; ``auto`` when there is none), any other file made absolute, ``none``
    for the grouped k-fold. A run records it, so a later ``evaluate`` or ``ensemble`` reads the same split even if
    another file appears beside the data."""
    if split_file in (None, "none"):
        return "none"
    if split_file == "auto":
        found = _split_file_beside(data)
        return str(found.resolve()) if found is not None else "auto"
    return str(Path(split_file).resolve())


def _split_file_beside(data: SampleSet) -> Path | None:
    """What ``auto`` reads: the split file shipped beside the data, if any."""
    return find_split_file(data.root) if data.root is not None else None


def dataset_name(data: SampleSet) -> str:
    root = data.root
    if root is None:
        return "images"
    name = root.resolve().name
    return "MSLD v2.0" if name.lower().startswith("msld") else name
