"""The audit on the real MSLD v2.0 with its official split (skipped when the data is absent)."""

from __future__ import annotations

import json
import time

import pytest

from mpoxscope.audit import AuditConfig, audit_dataset, find_duplicate_pairs, write_audit
from mpoxscope.data.samples import load_samples
from mpoxscope.data.splits import find_split_file, read_split_file

pytestmark = pytest.mark.realdata

# Pairs checked by eye (thumbnails side by side): the same photograph under two patient IDs.
KNOWN_COPIES = {
    ("CHP_26_01.jpg", "CHP_62_01.jpg"): "identical-file",
    ("HFMD_130_01.jpg", "HFMD_96_01.jpg"): "near",
    ("HEALTHY_21_01.jpg", "HEALTHY_77_01.jpg"): "near",
    ("CWP_02_01.jpg", "CWP_31_01.jpg"): "near",  # 353 px crop of an 831 px image
    ("HFMD_141_01.jpg", "HFMD_27_01.jpg"): "near",  # ~10 % crop
    ("HFMD_117_01.jpg", "HFMD_11_01.jpg"): "near",  # ~20 % crop, other aspect ratio
}
# Pairs that are not copies although their pHash is close (<= 12 bits): a single lesion on plain skin, two
# different photos with a black privacy bar, a patient's left and right hand.
NOT_COPIES = [("CHP_04_04.jpg", "CWP_39_01.jpg"), ("MKP_80_04.jpg", "MKP_95_01.jpg"),
              ("CHP_27_01.jpg", "CHP_40_01.jpg"), ("HFMD_05_01.jpg", "HFMD_05_02.jpg"),
              ("HFMD_73_01.jpg", "HEALTHY_79_01.jpg")]


def test_msld_audit_with_official_split(msld, tmp_path):
    start = time.perf_counter()
    data = load_samples(msld)
    split_file = find_split_file(msld)
    report = audit_dataset(data, read_split_file(split_file), AuditConfig(), str(split_file))
    write_audit(report, tmp_path)
    elapsed = time.perf_counter() - start
    assert elapsed < 60, f"audit took {elapsed:.0f} s"

    s = report.summary()
    assert (s["images"], s["patients"], s["classes"], s["unreadable"]) == (755, 524, 6, 0)
    found = {tuple(sorted((data.samples[p.a].filename, data.samples[p.b].filename))): p.kind for p in report.pairs}
    for pair, kind in KNOWN_COPIES.items():
        assert found.get(tuple(sorted(pair))) == kind, pair
    for pair in NOT_COPIES:
        assert tuple(sorted(pair)) not in found, pair
    assert len(found) <= 10  # nothing beyond the copies above plus a few same-patient crops

    # The official folds keep patients apart, but copies under different patient IDs cross them.
    assert [f.fold for f in report.folds] == ["fold1", "fold2", "fold3", "fold4", "fold5"]
    assert all(not f.patient_leaks for f in report.folds)
    assert all(f.duplicate_leaks and f.leaked_test for f in report.folds)
    d = json.loads((tmp_path / "audit.json").read_text())
    assert d["summary"]["leaks"]["fold1"]["duplicate_pairs"] == len(report.folds[0].duplicate_leaks)


def test_msld_not_copies_stay_rejected_at_a_looser_threshold(msld):
    data = load_samples(msld)
    index = data.by_filename()
    names = sorted({n for pair in NOT_COPIES for n in pair} | {"CWP_35_01.jpg", "HFMD_63_02.jpg", "HFMD_63_03.jpg"})
    subset = data.subset([index[n] for n in names])
    pairs = find_duplicate_pairs(subset, threshold=14)
    assert [(subset.samples[p.a].filename, subset.samples[p.b].filename) for p in pairs] == []
