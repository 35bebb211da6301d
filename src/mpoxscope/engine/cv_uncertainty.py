"""Cross-validation uncertainty and calibration, from the predictions each fold saved.

Per fold and pooled over every test prediction: 95 % bootstrap intervals resampling patients (a patient's
images are correlated, and the official MSLD test parts overlap, so one patient can contribute predictions from
several folds), test ECE with 15 bins, reliability diagrams, the risk–coverage curve with its AURC, and the
accuracy at the coverage each fold's validation-chosen abstain threshold gives.

When the folds also saved their validation predictions, a post-hoc variant recalibrates each fold with one
temperature fitted on the pooled validation predictions of all folds, leaving out that fold's test images
(:func:`~mpoxscope.engine.calibration.fit_pooled_calibration`); its test ECE is reported beside the folds' own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import softmax

from mpoxscope.data.samples import SampleSet
from mpoxscope.engine import rundir
from mpoxscope.engine.calibration import (
    apply_calibration,
    ece_consistency,
    expected_calibration_error,
    fit_pooled_calibration,
    logits_from_probs,
)
from mpoxscope.engine.uncertainty import (
    classification_cis,
    ece_words,
    fmt_ci,
    reliability_grid_png,
    risk_coverage,
    risk_coverage_png,
)
from mpoxscope.errors import MpoxscopeError
from mpoxscope.fileio import read_json, write_bytes

N_BINS = 15


def _fold_calibration(fold_dir: Path) -> dict:
    meta_file = fold_dir / rundir.CV_RUN / rundir.META
    try:
        return dict(read_json(meta_file).get("calibration") or {}) if meta_file.is_file() else {}
    except ValueError:
        return {}


def _selective(probs: np.ndarray, targets: np.ndarray, threshold: float | None) -> dict[str, Any]:
    keep = probs.max(1) >= (threshold or 0.0)
    correct = probs.argmax(1) == targets
    return {"coverage": float(keep.mean()), "accuracy_kept": float(correct[keep].mean()) if keep.any() else None,
            "n_kept": int(keep.sum())}


def _summary(probs: np.ndarray, targets: np.ndarray, groups: list[str], classes: list[str],
             keep_threshold: np.ndarray) -> dict[str, Any]:
    preds = probs.argmax(1)
    rc = risk_coverage(probs.max(1), preds == targets)
    keep = probs.max(1) >= keep_threshold
    return {"n": len(targets), "n_patients": len(set(groups)),
            "ci": classification_cis(targets, preds, classes, groups),
            "ece": expected_calibration_error(probs, targets, N_BINS),
            "ece_check": ece_consistency(probs, targets, N_BINS),
            "aurc": rc["aurc"], "aurc_optimal": rc["aurc_optimal"],
            "coverage": float(keep.mean()),
            "accuracy_kept": float((preds == targets)[keep].mean()) if keep.any() else None}


def _read(path: Path, classes: list[str]):
    from mpoxscope.engine.screening import read_predictions_csv

    preds, _ = read_predictions_csv(path, classes)
    return preds.names, preds.probs / preds.probs.sum(1, keepdims=True), preds.targets


def cv_uncertainty(out: str | Path, folds: list[str], data: SampleSet, protocol: str, log=print) -> dict[str, Any]:
    """Per-fold and pooled intervals, ECE and risk–coverage from ``OUT/<fold>/evaluation/predictions.csv``;
    writes ``OUT/reliability.png`` (one diagram per fold and pooled) and ``OUT/risk_coverage.png``. Returns the
    JSON-ready block for cv_summary.json, or ``{"skipped": reason}``."""
    out = Path(out)
    classes = list(data.classes)
    index = data.by_filename()

    def groups_of(names: list[str]) -> list[str]:
        return [data.samples[index[n]].group if n in index else n for n in names]

    try:
        tests = {f: _read(out / f / rundir.EVALUATION / rundir.PREDICTIONS, classes) for f in folds}
    except MpoxscopeError as e:
        log(f"uncertainty: skipped ({e})")
        return {"skipped": str(e)}
    cals = {f: _fold_calibration(out / f) for f in folds}
    per_fold, panels, curves, marks = {}, {}, {}, {}
    for f, (names, probs, y) in tests.items():
        thr = cals[f].get("abstain_threshold")
        per_fold[f] = {**_summary(probs, y, groups_of(names), classes, np.full(len(y), thr or 0.0)),
                       "abstain_threshold": thr, "calibration": cals[f].get("method", "temperature"),
                       "temperature": cals[f].get("temperature")}
        panels[f] = (probs, y)
        curves[f] = risk_coverage(probs.max(1), probs.argmax(1) == y)
        marks[f] = (per_fold[f]["coverage"], 1 - per_fold[f]["accuracy_kept"]
                    if per_fold[f]["accuracy_kept"] is not None else None)
    names = [n for f in folds for n in tests[f][0]]
    probs = np.concatenate([tests[f][1] for f in folds])
    y = np.concatenate([tests[f][2] for f in folds])
    thresholds = np.concatenate([np.full(len(tests[f][2]), cals[f].get("abstain_threshold") or 0.0) for f in folds])
    pooled = _summary(probs, y, groups_of(names), classes, thresholds)
    panels["pooled"] = (probs, y)
    curves["pooled"] = risk_coverage(probs.max(1), probs.argmax(1) == y)
    result: dict[str, Any] = {
        "protocol": protocol + "; intervals resample patients; each fold's own calibration and abstain "
                               "threshold (fitted on its validation part)",
        "ece_bins": N_BINS, "per_fold": per_fold, "pooled": pooled}
    alt = _pooled_validation_variant(out, folds, tests, cals, classes, groups_of, log)
    if alt is not None:
        result["pooled_validation_temperature"] = alt
        panels["pooled, pooled-val T"] = (alt.pop("_probs"), y)
    write_bytes(out / "reliability.png", reliability_grid_png(panels, "test reliability: " + protocol[:100], N_BINS))
    write_bytes(out / "risk_coverage.png", risk_coverage_png(curves, "test risk-coverage: " + protocol[:90], marks))
    log(f"[{protocol}] pooled test (n={pooled['n']}, {pooled['n_patients']} patients): accuracy "
        f"{fmt_ci(pooled['ci']['accuracy'])} %, macro-F1 {fmt_ci(pooled['ci']['f1_macro'])} %, ECE "
        f"{ece_words(pooled['ece'], pooled['ece_check'])}, AURC {pooled['aurc']:.3f}")
    return result


def _pooled_validation_variant(out: Path, folds: list[str], tests: dict, cals: dict, classes: list[str],
                               groups_of, log) -> dict[str, Any] | None:
    """Each fold recalibrated by one temperature fitted on all folds' validation predictions (its own test
    images excluded), from saved probabilities: no retraining, nothing fitted on test labels."""
    paths = {f: out / f / rundir.VALIDATION / rundir.PREDICTIONS for f in folds}
    if len(folds) < 2 or not all(p.is_file() for p in paths.values()):
        return None
    if any(c.get("method") == "vector" for c in cals.values()):
        log("uncertainty: pooled-validation temperature skipped (vector-scaled folds cannot be inverted)")
        return None
    try:
        vals = {f: _read(paths[f], classes) for f in folds}
    except MpoxscopeError as e:
        log(f"uncertainty: pooled-validation temperature skipped ({e})")
        return None
    parts = [(logits_from_probs(p, cals[f]), t, n) for f, (n, p, t) in vals.items()]
    per_fold, all_probs, thresholds = {}, [], []
    for f in folds:
        names, probs, y = tests[f]
        block = fit_pooled_calibration(parts, exclude=set(names))
        new = softmax(apply_calibration(logits_from_probs(probs, cals[f]), block), axis=1)
        thr = block["abstain_threshold"]
        per_fold[f] = {"method": block["method"], "temperature": block["temperature"], "n_pooled": block["n"],
                       "ece": expected_calibration_error(new, y, N_BINS), "abstain_threshold": thr,
                       **_selective(new, y, thr)}
        all_probs.append(new)
        thresholds.append(np.full(len(y), thr))
    probs = np.concatenate(all_probs)
    y = np.concatenate([tests[f][2] for f in folds])
    names = [n for f in folds for n in tests[f][0]]
    pooled = _summary(probs, y, groups_of(names), classes, np.concatenate(thresholds))
    return {"method": "one temperature per fold, fitted on the pooled validation predictions of all folds "
                      "minus that fold's test images (post hoc, from saved probabilities)",
            "per_fold": per_fold, "pooled": {k: pooled[k] for k in ("ece", "aurc", "coverage", "accuracy_kept")},
            "_probs": probs}


def uncertainty_report_lines(u: dict | None) -> list[str]:
    """The cv_report.md section: pooled and per-fold intervals, test ECE, AURC, abstention, the plots."""
    if not u:
        return []
    if "skipped" in u:
        return ["", "## Uncertainty and calibration (test)", "", f"Not computed: {u['skipped']}"]
    p = u["pooled"]
    lines = ["", "## Uncertainty and calibration (test)", "",
             f"Pooled over all {p['n']} test predictions ({p['n_patients']} patients; {p['ci']['method']}): "
             f"**accuracy {fmt_ci(p['ci']['accuracy'])} %**, **macro-F1 {fmt_ci(p['ci']['f1_macro'])} %**, "
             f"weighted F1 {fmt_ci(p['ci']['f1_weighted'])} % (value [95% CI]). Test ECE ({u['ece_bins']} equal-width "
             f"bins) {ece_words(p['ece'], p.get('ece_check'))}; AURC {p['aurc']:.3f} "
             f"(oracle {p['aurc_optimal']:.3f}); at each fold's validation-chosen abstain threshold: coverage "
             f"{100 * p['coverage']:.1f} %, accuracy on kept {_pct(p['accuracy_kept'])} %.", "",
             "| fold | n test | accuracy [95% CI] | macro-F1 [95% CI] | calibration | test ECE (a perfectly "
             "calibrated model's) | AURC | abstain threshold | coverage | accuracy on kept |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for f, r in u["per_fold"].items():
        t = f" (T={r['temperature']:.2f})" if r.get("temperature") not in (None, 1.0) else ""
        thr = "n/a" if r["abstain_threshold"] is None else f"{r['abstain_threshold']:.3f}"
        lines.append(f"| {f} | {r['n']} | {fmt_ci(r['ci']['accuracy'])} | {fmt_ci(r['ci']['f1_macro'])} | "
                     f"{r['calibration']}{t} | {r['ece']:.3f}{_perfect(r)} | {r['aurc']:.3f} | {thr} | "
                     f"{100 * r['coverage']:.1f} | {_pct(r['accuracy_kept'])} |")
    lines.append(f"| pooled | {p['n']} | {fmt_ci(p['ci']['accuracy'])} | {fmt_ci(p['ci']['f1_macro'])} | per fold | "
                 f"{p['ece']:.3f}{_perfect(p)} | {p['aurc']:.3f} | per fold | {100 * p['coverage']:.1f} | "
                 f"{_pct(p['accuracy_kept'])} |")
    lines += ["", "Per-class recall, pooled (value [95% CI], %): " + ", ".join(
        f"{c} {fmt_ci(iv)}" for c, iv in p["ci"]["recall"].items())]
    alt = u.get("pooled_validation_temperature")
    if alt:
        a = alt["pooled"]
        temps = ", ".join(f"{f} {r['temperature']:.2f}" for f, r in alt["per_fold"].items())
        lines += ["", f"Recalibrated with {alt['method']}: pooled test ECE **{a['ece']:.3f}** (folds' own: "
                  f"{p['ece']:.3f}); temperatures {temps}; coverage at the re-chosen thresholds "
                  f"{100 * a['coverage']:.1f} %, accuracy on kept {_pct(a['accuracy_kept'])} %."]
    lines += ["", "![reliability diagrams per fold and pooled](reliability.png) "
              "![risk-coverage curves](risk_coverage.png)"]
    return lines


def _perfect(r: dict) -> str:
    check = r.get("ece_check")
    return f" ({check['perfect_mean']:.3f})" if check else ""


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"
