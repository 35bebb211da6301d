"""Bootstrap intervals against closed forms, ECE against a hand-computed example, risk–coverage and AURC."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mpoxscope.engine.calibration import expected_calibration_error
from mpoxscope.engine.metrics import bootstrap_ci
from mpoxscope.engine.uncertainty import classification_cis, fmt_ci, reliability_png, risk_coverage, risk_coverage_png
from mpoxscope.errors import MpoxscopeError


def test_bootstrap_accuracy_matches_normal_approximation():
    # n = 4000 Bernoulli(0.8) outcomes: the 95 % interval is p +/- 1.96 sqrt(p (1 - p) / n) to within a few %.
    rng = np.random.default_rng(1)
    correct = rng.random(4000) < 0.8
    p = correct.mean()
    half = 1.959964 * math.sqrt(p * (1 - p) / len(correct))
    ci = bootstrap_ci(np.mean, correct, n=2000, seed=0)
    assert ci["value"] == pytest.approx(p)
    assert ci["low"] == pytest.approx(p - half, abs=0.1 * half)
    assert ci["high"] == pytest.approx(p + half, abs=0.1 * half)
    assert ci["level"] == pytest.approx(0.95) and ci["resampled"] == "4000 images"


def test_group_bootstrap_widens_to_the_number_of_patients():
    # 400 patients of 10 images each, every image of a patient right or wrong together: the effective sample
    # size is the 400 patients, so the interval is sqrt(10) times wider than an image-level one would be.
    rng = np.random.default_rng(2)
    patient_ok = rng.random(400) < 0.7
    correct, groups = np.repeat(patient_ok, 10), np.repeat(np.arange(400), 10)
    p = correct.mean()
    half_patients = 1.959964 * math.sqrt(p * (1 - p) / 400)
    ci = bootstrap_ci(np.mean, correct, groups=groups, n=2000, seed=0)
    assert ci["high"] - ci["low"] == pytest.approx(2 * half_patients, rel=0.12)
    naive = bootstrap_ci(np.mean, correct, n=2000, seed=0)
    assert (ci["high"] - ci["low"]) > 2.5 * (naive["high"] - naive["low"])
    assert ci["resampled"] == "400 patients"


def test_bootstrap_is_seeded_and_checks_input():
    x = np.arange(50) % 3 == 0
    assert bootstrap_ci(np.mean, x, n=200, seed=5) == bootstrap_ci(np.mean, x, n=200, seed=5)
    with pytest.raises(MpoxscopeError, match="no data"):
        bootstrap_ci(np.mean, np.array([]))
    with pytest.raises(MpoxscopeError, match="group labels"):
        bootstrap_ci(np.mean, x, groups=[1, 2])


def test_classification_cis_contain_the_point_and_handle_absent_classes():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 300)
    pred = np.where(rng.random(300) < 0.75, y, (y + 1) % 3)
    ci = classification_cis(y, pred, ["a", "b", "c", "never"], n=300)
    for key in ("accuracy", "f1_macro"):
        assert ci[key]["low"] <= ci[key]["value"] <= ci[key]["high"]
    assert ci["accuracy"]["value"] == pytest.approx((y == pred).mean())
    assert ci["recall"]["never"]["value"] is None  # class with no test images: no interval, not 0
    assert 0 < ci["recall"]["a"]["low"] < ci["recall"]["a"]["high"] < 1
    assert "300 images" in ci["method"]
    assert fmt_ci(ci["accuracy"]).count("[") == 1 and fmt_ci(None) == "n/a"


def test_ece_hand_computed_example():
    # Confidences 0.9, 0.9, 0.6, 0.6, 0.3(+0.7 elsewhere -> top 0.7): bins of width 1/15.
    # Bin (0.8667, 0.9333]: 2 cases, conf 0.9, accuracy 1/2 -> |0.5 - 0.9| = 0.4, weight 2/5.
    # Bin (0.5333, 0.6]:    2 cases, conf 0.6, accuracy 2/2 -> |1.0 - 0.6| = 0.4, weight 2/5.
    # Bin (0.6667, 0.7333]: 1 case,  conf 0.7, accuracy 0   -> 0.7, weight 1/5.
    # ECE = 0.4 * 0.4 + 0.4 * 0.4 + 0.2 * 0.7 = 0.46.
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6], [0.3, 0.7]])
    targets = np.array([0, 1, 0, 1, 0])
    assert expected_calibration_error(probs, targets, n_bins=15) == pytest.approx(0.46)


def test_risk_coverage_and_aurc():
    conf = np.array([0.9, 0.8, 0.7, 0.6])
    ok = np.array([True, False, True, True])
    rc = risk_coverage(conf, ok)
    assert rc["coverage"] == [0.25, 0.5, 0.75, 1.0]
    assert rc["risk"] == pytest.approx([0.0, 0.5, 1 / 3, 0.25])
    assert rc["aurc"] == pytest.approx((0 + 0.5 + 1 / 3 + 0.25) / 4)
    assert rc["aurc_optimal"] == pytest.approx(0.25 / 4)  # the one error kept last
    assert rc["eaurc"] > 0
    # Ties: the tied block is one threshold, and the result does not depend on the order inside it.
    tied = risk_coverage(np.array([0.9, 0.9, 0.5]), np.array([False, True, True]))
    assert tied["coverage"] == pytest.approx([2 / 3, 1.0])
    assert tied["aurc"] == risk_coverage(np.array([0.9, 0.9, 0.5]), np.array([True, False, True]))["aurc"]


def test_plots_are_pngs():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), 40)
    y = rng.integers(0, 3, 40)
    assert reliability_png(probs, y, "synthetic").startswith(b"\x89PNG")
    rc = risk_coverage(probs.max(1), probs.argmax(1) == y)
    assert risk_coverage_png({"fold1": rc}, "synthetic", marks={"fold1": (0.5, 0.3)}).startswith(b"\x89PNG")


def test_classification_cis_agree_with_sklearn_on_the_point_estimates():
    from sklearn.metrics import f1_score, recall_score

    rng = np.random.default_rng(4)
    y = rng.integers(0, 4, 200)
    pred = np.where(rng.random(200) < 0.6, y, rng.integers(0, 4, 200))
    ci = classification_cis(y, pred, list("abcd"), groups=np.arange(200), n=50)
    assert "200 images" in ci["method"]  # singleton groups = the image bootstrap
    assert ci["f1_macro"]["value"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert ci["f1_weighted"]["value"] == pytest.approx(f1_score(y, pred, average="weighted"))
    assert ci["recall"]["c"]["value"] == pytest.approx(recall_score(y, pred, labels=[2], average="macro"))
    assert ci["f1"]["d"]["value"] == pytest.approx(f1_score(y, pred, labels=[3], average="macro"))


def test_classification_cis_count_the_resamples_bootstrap_ci_indexes():
    """classification_cis counts each resample's confusion matrix instead of indexing the arrays (milliseconds
    instead of a second for 2000 resamples); the intervals are those of bootstrap_ci on the same seed, with
    sklearn computing the statistics, for images and for patients."""
    from sklearn.metrics import f1_score, recall_score

    rng = np.random.default_rng(7)
    y = rng.integers(0, 3, 120)
    pred = np.where(rng.random(120) < 0.7, y, rng.integers(0, 4, 120))
    patients = np.repeat(np.arange(50), rng.integers(1, 5, 50))[:120]

    def stats(a, b):
        present = np.unique(a)
        return [np.mean(a == b), f1_score(a, b, labels=present, average="macro", zero_division=0),
                recall_score(a, b, labels=[1], average="macro", zero_division=0) if (a == 1).any() else np.nan]

    for groups in (None, patients):
        ci = classification_cis(y, pred, list("abcd"), groups=groups, n=300, seed=11)
        ref = bootstrap_ci(stats, y, pred, groups=groups, n=300, seed=11)
        got = [ci["accuracy"], ci["f1_macro"], ci["recall"]["b"]]
        for i, c in enumerate(got):
            assert (c["low"], c["high"]) == pytest.approx((ref["low"][i], ref["high"][i]), abs=1e-12)
        assert ci["method"].endswith(f"{ref['resampled']}, seed 11")
