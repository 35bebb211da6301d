"""Leaks across train / validation / test in one fold: a patient, or a duplicate pair, on two sides of a split."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from mpoxscope.audit.duplicates import DuplicatePair
from mpoxscope.data.samples import SampleSet
from mpoxscope.data.splits import SPLITS, Fold


@dataclass(frozen=True)
class PatientLeak:
    """A patient whose images sit in more than one part of a fold: ``files`` maps split -> file names."""

    patient: str
    files: dict[str, list[str]]

    @property
    def splits(self) -> list[str]:
        return [s for s in SPLITS if s in self.files]

    def to_dict(self) -> dict:
        return {"patient": self.patient, "splits": self.splits, "files": self.files}


@dataclass(frozen=True)
class DuplicateLeak:
    """A duplicate pair whose two images are in different parts of a fold (``split_a`` holds ``pair.a``)."""

    pair: DuplicatePair
    split_a: str
    split_b: str
    same_patient: bool

    def to_dict(self, data: SampleSet | None = None) -> dict:
        d = {"split_a": self.split_a, "split_b": self.split_b, "same_patient": self.same_patient,
             **self.pair.to_dict()}
        if data is not None:
            d["file_a"] = data.samples[self.pair.a].filename
            d["file_b"] = data.samples[self.pair.b].filename
        return d


@dataclass
class FoldLeaks:
    """Everything that crosses the parts of one fold. ``leaked_test`` = test indices that share a patient with,
    or duplicate, an image in train or validation (see :func:`leaked_test_indices`)."""

    fold: str
    sizes: dict[str, int]
    patient_leaks: list[PatientLeak] = field(default_factory=list)
    duplicate_leaks: list[DuplicateLeak] = field(default_factory=list)
    leaked_test: list[int] = field(default_factory=list)

    @property
    def has_leaks(self) -> bool:
        return bool(self.patient_leaks or self.duplicate_leaks)

    @property
    def cross_patient_duplicate_leaks(self) -> list[DuplicateLeak]:
        """Duplicate leaks a patient-grouped split cannot prevent (the two images carry different patient IDs)."""
        return [d for d in self.duplicate_leaks if not d.same_patient]

    def to_dict(self, data: SampleSet | None = None) -> dict:
        return {
            "fold": self.fold,
            "sizes": self.sizes,
            "patient_leaks": [p.to_dict() for p in self.patient_leaks],
            "duplicate_leaks": [d.to_dict(data) for d in self.duplicate_leaks],
            "n_patient_leaks": len(self.patient_leaks),
            "n_duplicate_leaks": len(self.duplicate_leaks),
            "n_cross_patient_duplicate_leaks": len(self.cross_patient_duplicate_leaks),
            "leaked_test": ([data.samples[i].filename for i in self.leaked_test] if data is not None
                            else self.leaked_test),
        }


def split_membership(fold: Fold) -> dict[int, list[str]]:
    """Sample index -> the parts of ``fold`` it is in (normally one; more when the split file is broken)."""
    member: dict[int, list[str]] = defaultdict(list)
    for split in SPLITS:
        for i in fold.indices(split):
            member[i].append(split)
    return member


def patient_leaks(data: SampleSet, fold: Fold) -> list[PatientLeak]:
    """Patients (groups) with images in two or more of train / validation / test, sorted by patient."""
    files: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for split in SPLITS:
        for i in fold.indices(split):
            s = data.samples[i]
            files[s.group][split].append(s.filename)
    return [PatientLeak(g, {k: sorted(v) for k, v in by_split.items()})
            for g, by_split in sorted(files.items()) if len(by_split) > 1]


def duplicate_leaks(data: SampleSet, fold: Fold, pairs: Iterable[DuplicatePair]) -> list[DuplicateLeak]:
    """Duplicate pairs whose images are in different parts of ``fold``."""
    member = split_membership(fold)
    out = []
    for p in pairs:
        crossing = [(sa, sb) for sa in member.get(p.a, []) for sb in member.get(p.b, []) if sa != sb]
        if crossing:
            sa, sb = crossing[0]
            same = data.samples[p.a].group == data.samples[p.b].group
            out.append(DuplicateLeak(p, sa, sb, same))
    return out


def leaked_test_indices(data: SampleSet, fold: Fold, pairs: Iterable[DuplicatePair]) -> set[int]:
    """Test indices of ``fold`` that share a patient with, or are an exact/near duplicate of, an image in its
    train or validation part. Drop them from the test set to measure on unseen pictures and patients."""
    seen = set(fold.train) | set(fold.validation)
    seen_groups = {data.samples[i].group for i in seen}
    test = set(fold.test)
    leaked = {i for i in test if i in seen or data.samples[i].group in seen_groups}
    for p in pairs:
        if p.a in test and p.b in seen:
            leaked.add(p.a)
        if p.b in test and p.a in seen:
            leaked.add(p.b)
    return leaked


def cross_split_leaks(data: SampleSet, fold: Fold, pairs: Iterable[DuplicatePair]) -> FoldLeaks:
    """Patient and duplicate leaks of one fold; ``pairs`` index into ``data`` (compute them once per dataset)."""
    pairs = list(pairs)
    return FoldLeaks(
        fold=fold.name,
        sizes={s: len(fold.indices(s)) for s in SPLITS},
        patient_leaks=patient_leaks(data, fold),
        duplicate_leaks=duplicate_leaks(data, fold, pairs),
        leaked_test=sorted(leaked_test_indices(data, fold, pairs)),
    )
