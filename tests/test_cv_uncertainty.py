"""Cross-validation intervals, test ECE and pooled-validation recalibration, on fabricated fold outputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from scipy.special import softmax

from mpoxscope.data.samples import Sample, SampleSet
from mpoxscope.engine.cv_uncertainty import cv_uncertainty, uncertainty_report_lines

CLASSES = ["Mpox", "Chickenpox", "Measles"]


def _write(path: Path, names, probs, y) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["filename", "true", "predicted", "confidence", *CLASSES])
        for n, p, t in zip(names, probs, y):
            w.writerow([n, CLASSES[t], CLASSES[int(p.argmax())], f"{p.max():.4f}", *(f"{v:.6f}" for v in p)])


def _fake_cv(tmp_path: Path, overconfidence: float = 3.0) -> tuple[Path, SampleSet]:
    """Three folds; every model is overconfident by the same factor and calibrated by no temperature."""
    rng = np.random.default_rng(0)
    n = 240
    y = rng.integers(0, 3, n)
    logits = rng.normal(0, 1, (n, 3))
    logits[np.arange(n), y] += 1.2
    # labels drawn from softmax(logits): calibrated at T = 1, then sharpened by `overconfidence`
    y = (softmax(logits, 1).cumsum(1) > rng.random((n, 1))).argmax(1)
    names = [f"MKP_{i // 2:03d}_{i % 2:02d}.jpg" for i in range(n)]  # two images per patient
    data = SampleSet([Sample(Path(nm), CLASSES[t], nm[:7]) for nm, t in zip(names, y)], CLASSES)
    probs = softmax(logits * overconfidence, 1)
    out = tmp_path / "cv"
    for k in range(3):
        test = np.arange(n)[k * 80:(k + 1) * 80]
        val = np.setdiff1d(np.arange(n), test)[:100]
        _write(out / f"fold{k + 1}" / "evaluation" / "predictions.csv", [names[i] for i in test], probs[test], y[test])
        _write(out / f"fold{k + 1}" / "validation" / "predictions.csv", [names[i] for i in val], probs[val], y[val])
        (out / f"fold{k + 1}" / "run").mkdir(parents=True)
        (out / f"fold{k + 1}" / "run" / "model.json").write_text(json.dumps(
            {"calibration": {"method": "none", "temperature": 1.0, "abstain_threshold": 0.8}}))
    return out, data


def test_cv_uncertainty_pooled_cis_ece_and_pooled_validation_temperature(tmp_path):
    out, data = _fake_cv(tmp_path)
    logs: list[str] = []
    u = cv_uncertainty(out, ["fold1", "fold2", "fold3"], data, "synthetic, 3 folds", log=logs.append)
    p = u["pooled"]
    assert p["n"] == 240 and p["n_patients"] == 120 and "120 patients" in p["ci"]["method"]
    assert p["ci"]["accuracy"]["low"] < p["ci"]["accuracy"]["value"] < p["ci"]["accuracy"]["high"]
    assert set(u["per_fold"]) == {"fold1", "fold2", "fold3"} and u["per_fold"]["fold1"]["n"] == 80
    # Overconfident by 3x: high ECE as saved; one pooled-validation temperature near 3 brings it down.
    alt = u["pooled_validation_temperature"]
    assert all(r["temperature"] == pytest.approx(3.0, rel=0.3) for r in alt["per_fold"].values())
    assert all(r["n_pooled"] < 300 for r in alt["per_fold"].values())  # the fold's test images left out
    assert alt["pooled"]["ece"] < p["ece"] and p["ece"] > 0.1
    # ...and far beyond what sampling alone gives a calibrated model on 240 predictions
    check = p["ece_check"]
    assert check["p_value"] == 0.0 and check["perfect_p95"] < p["ece"] and check["ece"] == pytest.approx(p["ece"])
    assert (out / "reliability.png").stat().st_size > 1000 and (out / "risk_coverage.png").stat().st_size > 1000
    text = "\n".join(uncertainty_report_lines(u))
    assert "| pooled | 240 |" in text and "Recalibrated with" in text and "reliability.png" in text
    assert "a perfectly calibrated model with these confidences" in text and "P(ECE ≥ observed) = 0.00" in text
    assert any("pooled test (n=240, 120 patients)" in line for line in logs)


def test_cv_uncertainty_skips_with_a_reason(tmp_path):
    out, data = _fake_cv(tmp_path)
    (out / "fold2" / "evaluation" / "predictions.csv").unlink()
    u = cv_uncertainty(out, ["fold1", "fold2"], data, "synthetic", log=lambda *_: None)
    assert "skipped" in u and "fold2" in u["skipped"]
    assert "Not computed" in "\n".join(uncertainty_report_lines(u))
