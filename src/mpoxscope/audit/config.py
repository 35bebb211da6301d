"""Audit settings and their defaults (a light module: the CLI imports it to build ``--help``)."""

from __future__ import annotations

from dataclasses import dataclass

from mpoxscope.errors import MpoxscopeError

#: Near-duplicate candidates up to this pHash distance (bits of 64). Measured: copies edited by JPEG q20, 0.5x/1.6x
#: resize, 5-10 % crops, flips and colour changes reach <= 8; the MSLD v2.0 copies found by eye reach <= 10.
DEFAULT_THRESHOLD = 10
#: Minimum aligned fine-detail correlation of a near duplicate (copies >= 0.69, other photos <= 0.61).
DEFAULT_MIN_CORRELATION = 0.65


def check_thresholds(threshold: int, min_correlation: float) -> None:
    """Raise MpoxscopeError for thresholds outside their range."""
    if not 0 <= threshold <= 64:
        raise MpoxscopeError(f"--threshold: must be between 0 and 64 bits (got {threshold})")
    if not -1.0 <= min_correlation <= 1.0:
        raise MpoxscopeError(f"--min-correlation: must be between -1 and 1 (got {min_correlation})")


@dataclass(frozen=True)
class AuditConfig:
    """``threshold``: near-duplicate candidates up to this pHash distance (bits of 64). ``min_correlation``: a
    candidate counts when its aligned fine-detail correlation reaches this (and half of it in the median tile).
    ``html_pairs``: most pairs drawn with thumbnails; ``thumb_side``: their size in pixels."""

    threshold: int = DEFAULT_THRESHOLD
    min_correlation: float = DEFAULT_MIN_CORRELATION
    html_pairs: int = 200
    thumb_side: int = 112

    def __post_init__(self) -> None:
        check_thresholds(self.threshold, self.min_correlation)
        if self.html_pairs < 0:
            raise MpoxscopeError(f"--html-pairs: must be 0 or more (got {self.html_pairs})")
