"""Canonical class names: folder names from different releases map onto one vocabulary."""

from __future__ import annotations

import re

#: Canonical order of the known classes; unknown classes follow, sorted by name.
CANONICAL_CLASSES: tuple[str, ...] = ("Mpox", "Chickenpox", "Measles", "Cowpox", "HFMD", "Healthy")

_ALIASES: dict[str, str] = {
    "mpox": "Mpox",
    "monkeypox": "Mpox",
    "mkp": "Mpox",
    "mpx": "Mpox",
    "chickenpox": "Chickenpox",
    "chp": "Chickenpox",
    "varicella": "Chickenpox",
    "measles": "Measles",
    "msl": "Measles",
    "cowpox": "Cowpox",
    "cwp": "Cowpox",
    "hfmd": "HFMD",
    "handfootandmouthdisease": "HFMD",
    "handfootmouthdisease": "HFMD",
    "handfootandmouth": "HFMD",
    "healthy": "Healthy",
    "normal": "Healthy",
    "healthyskin": "Healthy",
    "normalskin": "Healthy",
}


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def canonical_class(name: str) -> str:
    """Map a folder or label name to its canonical class; names we do not know are kept as they are.

    >>> canonical_class("Monkeypox"), canonical_class("Hand, foot and mouth disease"), canonical_class("Normal")
    ('Mpox', 'HFMD', 'Healthy')
    """
    return _ALIASES.get(_key(name), name.strip())


def sort_classes(names: set[str] | list[str]) -> list[str]:
    """Known classes in canonical order, then any others alphabetically."""
    names = set(names)
    known = [c for c in CANONICAL_CLASSES if c in names]
    return known + sorted(names - set(known))
