"""The audit of a dataset and its split: what is in it, what is duplicated, what leaks across train/val/test."""

from __future__ import annotations

import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import pandas as pd

from mpoxscope import __version__
from mpoxscope.audit.config import DEFAULT_MIN_CORRELATION, DEFAULT_THRESHOLD, AuditConfig
from mpoxscope.audit.duplicates import DuplicatePair, find_duplicates
from mpoxscope.audit.hashing import N_VARIANTS, ImageRecord, image_records
from mpoxscope.audit.leaks import FoldLeaks, cross_split_leaks
from mpoxscope.data.samples import SampleSet
from mpoxscope.data.splits import Fold, folds_from_table


@dataclass(frozen=True)
class ClassSummary:
    name: str
    images: int
    patients: int
    unreadable: int


@dataclass(frozen=True)
class UnreadableFile:
    file: str
    label: str
    reason: str


@dataclass
class AuditReport:
    """Result of :func:`audit_dataset`; ``to_dict()`` is what ``audit.json`` holds. ``data`` and ``records`` are
    kept for rendering (thumbnails) and are not serialised."""

    dataset: str
    split_file: str | None
    config: AuditConfig
    classes: list[ClassSummary]
    sizes: dict[str, int]
    modes: dict[str, int]
    formats: dict[str, int]
    unreadable: list[UnreadableFile]
    pairs: list[DuplicatePair]
    folds: list[FoldLeaks]
    seconds: float
    data: SampleSet = field(repr=False)
    records: list[ImageRecord] = field(repr=False)
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @property
    def has_leaks(self) -> bool:
        return any(f.has_leaks for f in self.folds)

    def count(self, kind: str) -> int:
        return sum(p.kind == kind for p in self.pairs)

    def pair_dict(self, p: DuplicatePair) -> dict:
        sa, sb = self.data.samples[p.a], self.data.samples[p.b]
        return {**p.to_dict(), "file_a": sa.filename, "file_b": sb.filename, "class_a": sa.label,
                "class_b": sb.label, "patient_a": sa.group, "patient_b": sb.group}

    def summary(self) -> dict:
        return {
            "images": len(self.data),
            "patients": len(set(self.data.groups)),
            "classes": len(self.classes),
            "unreadable": len(self.unreadable),
            "identical_file_pairs": self.count("identical-file"),
            "identical_pixel_pairs": self.count("identical-pixels"),
            "near_duplicate_pairs": self.count("near"),
            "pairs_across_classes": sum(self.data.samples[p.a].label != self.data.samples[p.b].label
                                        for p in self.pairs),
            "pairs_across_patients": sum(self.data.samples[p.a].group != self.data.samples[p.b].group
                                         for p in self.pairs),
            "leaks": {f.fold: {"patients": len(f.patient_leaks), "duplicate_pairs": len(f.duplicate_leaks),
                               "cross_patient_duplicate_pairs": len(f.cross_patient_duplicate_leaks),
                               "leaked_test_images": len(f.leaked_test)} for f in self.folds},
            "has_leaks": self.has_leaks,
        }

    def to_dict(self) -> dict:
        sides = [min(r.width, r.height) for r in self.records if r.width]
        return {
            "protocol": {
                "dataset": self.dataset,
                "split_file": self.split_file,
                "folds": [f.fold for f in self.folds],
                "threshold_bits": self.config.threshold,
                "min_correlation": self.config.min_correlation,
                "method": (f"sha256 of file bytes and of decoded RGB pixels; pHash (imagehash, 64 bits) minimised "
                           f"over {N_VARIANTS} flip/crop variants, candidates <= threshold confirmed by aligned "
                           f"high-pass correlation >= min_correlation (median 3x3 tile >= half of it)"),
                "mpoxscope_version": __version__,
                "created": self.created,
                "seconds": round(self.seconds, 2),
            },
            "summary": self.summary(),
            "classes": [asdict(c) for c in self.classes],
            "image_sizes": self.sizes,
            "shorter_side": ({"min": min(sides), "median": statistics.median(sides), "max": max(sides)}
                             if sides else None),
            "modes": self.modes,
            "formats": self.formats,
            "unreadable": [asdict(u) for u in self.unreadable],
            "duplicates": [self.pair_dict(p) for p in self.pairs],
            "folds": [f.to_dict(self.data) for f in self.folds],
            "images": [{"file": s.filename, "class": s.label, "patient": s.group, "width": r.width,
                        "height": r.height, "mode": r.mode, "format": r.format, "bytes": r.file_size,
                        "sha256": r.sha256, "phash": r.phash_hex, "error": r.error}
                       for s, r in zip(self.data.samples, self.records)],
        }


def find_duplicate_pairs(data: SampleSet, threshold: int = DEFAULT_THRESHOLD,
                    min_correlation: float = DEFAULT_MIN_CORRELATION) -> list[DuplicatePair]:
    """Exact and near-duplicate pairs of a dataset (indices into ``data``). Compute once, reuse for every fold
    (:func:`mpoxscope.audit.leaks.leaked_test_indices`); image hashes are cached in memory."""
    return find_duplicates(image_records([s.path for s in data.samples]), threshold, min_correlation)


def relative_name(data: SampleSet, index: int) -> str:
    """The path of a sample relative to the dataset root (its file name when it lies elsewhere)."""
    path = data.samples[index].path
    if data.root is not None and path.is_relative_to(data.root):
        return str(path.relative_to(data.root))
    return path.name


def _counts(values: list[str]) -> dict[str, int]:
    return dict(Counter(v for v in values if v).most_common())


def audit_dataset(data: SampleSet, table: pd.DataFrame | None = None, config: AuditConfig | None = None,
                  split_file: str | None = None) -> AuditReport:
    """Audit ``data`` and, when a split ``table`` (fold, split, filename) is given, every fold of it.

    Unreadable images are listed, never raised; leaks are reported, never raised. ``split_file`` only labels
    the report."""
    config = config or AuditConfig()
    start = time.perf_counter()
    records = image_records([s.path for s in data.samples])
    pairs = find_duplicates(records, config.threshold, config.min_correlation)
    folds: list[Fold] = []
    if table is not None:
        folds = folds_from_table(data, table, split_file or "split table", check_groups=False)
    classes = []
    for c in data.classes:
        idx = [i for i, s in enumerate(data.samples) if s.label == c]
        classes.append(ClassSummary(c, len(idx), len({data.samples[i].group for i in idx}),
                                    sum(not records[i].ok for i in idx)))
    unreadable = [UnreadableFile(relative_name(data, i), s.label, r.error or "")
                  for i, (s, r) in enumerate(zip(data.samples, records)) if not r.ok]
    return AuditReport(
        dataset=str(data.root) if data.root is not None else "",
        split_file=split_file,
        config=config,
        classes=classes,
        sizes=_counts([f"{r.width}x{r.height}" for r in records if r.width]),
        modes=_counts([r.mode for r in records]),
        formats=_counts([r.format for r in records]),
        unreadable=unreadable,
        pairs=pairs,
        folds=[cross_split_leaks(data, f, pairs) for f in folds],
        seconds=time.perf_counter() - start,
        data=data,
        records=records,
    )
