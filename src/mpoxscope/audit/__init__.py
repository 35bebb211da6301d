"""Dataset and split audit: exact and near-duplicate images, and patients or duplicates that leak across
train / validation / test. ``mpoxscope audit`` is the command line; the Python API is exported here (loaded on
first use, so that building the CLI's ``--help`` does not import numpy and scipy). Pairs are found once per
dataset, leaks once per fold:

>>> pairs = find_duplicate_pairs(data)  # doctest: +SKIP
>>> drop = leaked_test_indices(data, fold, pairs)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AuditConfig": "config",
    "AuditReport": "report",
    "audit_dataset": "report",
    "find_duplicate_pairs": "report",
    "DuplicatePair": "duplicates",
    "find_duplicates": "duplicates",
    "find_near_duplicates": "duplicates",
    "DuplicateLeak": "leaks",
    "FoldLeaks": "leaks",
    "PatientLeak": "leaks",
    "cross_split_leaks": "leaks",
    "leaked_test_indices": "leaks",
    "write_audit": "render",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mpoxscope.audit' has no attribute {name!r}")
    return getattr(importlib.import_module(f"mpoxscope.audit.{_EXPORTS[name]}"), name)
