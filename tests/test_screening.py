"""Screening mode: the threshold choice, the decision rule, pooled cross-validation thresholds that never see a
fold's test images, the reports, and the same decision from `predict`, the API and the page."""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from mpoxscope.cli import main
from mpoxscope.engine.screening import (
    FoldPredictions,
    choose_threshold,
    decide,
    fit_screening,
    pooled_thresholds,
    screen_cv_output,
    screening_metrics,
)
from mpoxscope.errors import MpoxscopeError

CLASSES = ["Mpox", "Chickenpox", "Measles", "Cowpox", "HFMD", "Healthy"]
STATIC = Path(__file__).resolve().parents[1] / "src" / "mpoxscope" / "serve" / "static"


# ----- threshold choice ------------------------------------------------------------------------------------------

def test_threshold_known_answer():
    pos = np.arange(1, 11) / 10.0  # ten target cases: 0.1 .. 1.0
    neg = np.array([0.05, 0.15, 0.95])
    scores = np.r_[pos, neg]
    is_t = np.r_[np.ones(10, bool), np.zeros(3, bool)]
    assert choose_threshold(scores, is_t, 0.9) == pytest.approx(0.2)  # 9 of 10 at >= 0.2
    assert choose_threshold(scores, is_t, 0.85) == pytest.approx(0.2)  # ceil(8.5) = 9
    assert choose_threshold(scores, is_t, 0.8) == pytest.approx(0.3)
    assert choose_threshold(scores, is_t, 1.0) == pytest.approx(0.1)
    assert choose_threshold(scores, is_t, 0.05) == pytest.approx(1.0)  # one case is enough
    # 0.9 * 30 is 27.000000000000004 in floating point: still 27 cases, not 28
    assert choose_threshold(np.arange(30.0), np.ones(30, bool), 0.9) == 3.0


def test_threshold_ties_and_negatives_do_not_move_it():
    scores = np.array([0.5, 0.5, 0.5, 0.2, 0.9, 0.1])
    is_t = np.array([1, 1, 1, 1, 0, 0], bool)
    assert choose_threshold(scores, is_t, 0.5) == 0.5  # keeps 3 of 4 (ties kept together)
    moved = scores.copy()
    moved[~is_t] = [0.0, 0.99]
    assert choose_threshold(moved, is_t, 0.5) == 0.5


@pytest.mark.parametrize("seed", range(5))
def test_threshold_is_the_largest_that_reaches_the_target(seed):
    rng = np.random.default_rng(seed)
    scores = np.round(rng.random(80), 2)  # rounding makes ties
    is_t = rng.random(80) < 0.3
    for s in (0.5, 0.9, 0.95):
        t = choose_threshold(scores, is_t, s)
        assert (scores[is_t] >= t).mean() >= s
        higher = np.unique(scores[scores > t])
        assert all((scores[is_t] >= h).mean() < s for h in higher)


def test_confident_threshold_keeps_a_margin_of_the_right_size():
    # 400 target cases from 400 patients, evenly spread scores: the point rule keeps exactly 90 %; the 95 %-confident
    # rule must keep more, by about 1.645 binomial standard deviations (sqrt(0.9 * 0.1 / 400) = 1.5 points).
    scores = np.linspace(0.001, 1.0, 400)
    is_t = np.ones(400, bool)
    point = choose_threshold(scores, is_t, 0.9)
    assert (scores >= point).mean() == pytest.approx(0.9, abs=0.003)
    kept = (scores >= choose_threshold(scores, is_t, 0.9, confidence=0.95)).mean()
    sd = math.sqrt(0.9 * 0.1 / 400)
    assert 0.9 + 1.2 * sd <= kept <= 0.9 + 2.2 * sd
    # more confidence, never a higher threshold; same seed, same answer
    t90, t95, t99 = (choose_threshold(scores, is_t, 0.9, confidence=c) for c in (0.9, 0.95, 0.99))
    assert t99 <= t95 <= t90 <= point
    assert t95 == choose_threshold(scores, is_t, 0.9, confidence=0.95)


def test_confident_threshold_counts_patients_not_photos():
    # The same 400 cases from 20 patients of 20 photos each (scores clustered by patient): far less information,
    # so the bound is wider and the threshold lower than with 400 independent patients.
    rng = np.random.default_rng(0)
    patient_level = np.repeat(rng.random(20), 20)
    scores = np.clip(patient_level + rng.normal(0, 0.02, 400), 0, 1)
    is_t = np.ones(400, bool)
    independent = choose_threshold(scores, is_t, 0.9, confidence=0.95)
    clustered = choose_threshold(scores, is_t, 0.9, confidence=0.95, groups=np.repeat(np.arange(20), 20))
    assert clustered < independent
    with pytest.raises(MpoxscopeError, match="confidence"):
        choose_threshold(scores, is_t, 0.9, confidence=1.0)
    with pytest.raises(MpoxscopeError, match="groups"):
        choose_threshold(scores, is_t, 0.9, confidence=0.95, groups=[1, 2])


@pytest.mark.parametrize("scores,is_t,sens,match", [
    ([0.1, 0.2], [False, False], 0.9, "no cases of the target class"),
    ([0.1, 0.2], [True, False], 0.0, r"must be in \(0, 1\]"),
    ([0.1, 0.2], [True, False], 1.5, r"must be in \(0, 1\]"),
    ([0.1, 0.2], [True, False], float("nan"), r"must be in \(0, 1\]"),
    ([0.1, float("nan")], [True, False], 0.9, "NaN"),
    ([0.1, 0.2], [True], 0.9, "equal length"),
])
def test_threshold_errors(scores, is_t, sens, match):
    with pytest.raises(MpoxscopeError, match=match):
        choose_threshold(np.array(scores), np.array(is_t), sens)


def _probs(n: int, seed: int = 0, k: int = 6, signal: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += signal
    p = np.exp(logits)
    return p / p.sum(1, keepdims=True), y


def test_fit_screening_block_and_aliases():
    p, y = _probs(120)
    block = fit_screening(p, y, CLASSES, target_class="Monkeypox", sensitivity=0.9, source="fold1 validation")
    assert block["target_class"] == "Mpox" and block["source"] == "fold1 validation"
    is_t = y == 0
    assert block["threshold"] == choose_threshold(p[:, 0], is_t, 0.9, confidence=0.95)
    assert block["confidence"] == 0.95
    assert fit_screening(p, y, CLASSES, confidence=None)["threshold"] == choose_threshold(p[:, 0], is_t, 0.9)
    assert block["n_validation_target"] == int(is_t.sum())
    assert block["validation_sensitivity"] >= 0.9
    flagged = p[:, 0] >= block["threshold"]
    assert block["validation_specificity"] == pytest.approx((~flagged[~is_t]).mean())
    assert block["validation_referral_rate"] == pytest.approx(flagged.mean())
    assert fit_screening(p, y, CLASSES, "MKP")["threshold"] == fit_screening(p, y, CLASSES, "Mpox")["threshold"]
    assert fit_screening(p, y, CLASSES, "measles")["target_class"] == "Measles"  # any class can be screened
    with pytest.raises(MpoxscopeError, match="not one of the model's classes"):
        fit_screening(p, y, CLASSES, "Smallpox")


# ----- the decision ----------------------------------------------------------------------------------------------

SCREEN = {"target_class": "Mpox", "threshold": 0.2, "target_sensitivity": 0.9}
CAL = {"abstain_threshold": 0.6}


@pytest.mark.parametrize("probs,calibration,screening,kind,label,text", [
    # P(Mpox) 0.25 >= 0.2: refer although Healthy is confidently on top
    ([0.25, 0.0, 0.0, 0.0, 0.0, 0.75], CAL, SCREEN, "refer_target", "possible Mpox", "possible Mpox — refer"),
    # P(Mpox) below its threshold and top 0.5 < 0.6: uncertain
    ([0.1, 0.5, 0.4, 0.0, 0.0, 0.0], CAL, SCREEN, "uncertain", "uncertain", "uncertain — refer to a clinician"),
    # confident look-alike: the class
    ([0.1, 0.9, 0.0, 0.0, 0.0, 0.0], CAL, SCREEN, "class", "Chickenpox", "Chickenpox"),
    # Mpox on top is always referred, even with a threshold above its probability
    ([0.7, 0.3, 0.0, 0.0, 0.0, 0.0], CAL, {**SCREEN, "threshold": 0.8}, "refer_target", "possible Mpox",
     "possible Mpox — refer"),
    # no screening block: plain abstain rule; no calibration: the default threshold 0.5
    ([0.25, 0.0, 0.0, 0.0, 0.0, 0.75], CAL, None, "class", "Healthy", "Healthy"),
    ([0.3, 0.45, 0.25, 0.0, 0.0, 0.0], None, None, "uncertain", "uncertain", "uncertain — refer to a clinician"),
    ([0.3, 0.55, 0.15, 0.0, 0.0, 0.0], None, None, "class", "Chickenpox", "Chickenpox"),
])
def test_decide_kinds(probs, calibration, screening, kind, label, text):
    d = decide(np.array(probs), CLASSES, calibration, screening)
    assert (d.kind, d.label, d.text) == (kind, label, text)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_decide_never_a_class_for_non_finite(bad):
    p = np.array([0.9, bad, 0.0, 0.0, 0.0, 0.1])
    d = decide(p, CLASSES, CAL, SCREEN)
    assert d.kind == "uncertain" and "refer to a clinician" in d.text and "no valid probabilities" in d.text
    assert decide(np.full(6, np.nan), CLASSES, None, None).kind == "uncertain"
    assert decide(np.array([0.5, 0.5]), CLASSES, None, None).kind == "uncertain"  # wrong length


@pytest.mark.parametrize("screening,match", [
    ({"target_class": "Mpox", "threshold": "high"}, "screening.threshold"),
    ({"target_class": "Mpox", "threshold": 1.5}, "screening.threshold"),
    ({"target_class": "Mpox", "threshold": float("nan")}, "screening.threshold"),
    ({"target_class": "Smallpox", "threshold": 0.2}, "screening.target_class"),
    ([0.2], "screening must be an object"),
])
def test_decide_rejects_malformed_screening(screening, match):
    with pytest.raises(MpoxscopeError, match=match):
        decide(np.full(6, 1 / 6), CLASSES, None, screening)


# ----- metrics ---------------------------------------------------------------------------------------------------

def test_screening_metrics_counts():
    probs = np.array([
        [0.30, 0.70, 0, 0, 0, 0],  # Mpox, referred (0.30 >= 0.2)
        [0.25, 0.0, 0.0, 0.0, 0.0, 0.75],  # Mpox, referred
        [0.05, 0.0, 0.0, 0.0, 0.0, 0.95],  # Mpox, missed: called Healthy
        [0.10, 0.40, 0.5, 0, 0, 0],  # Mpox, uncertain (top 0.5 < 0.6)
        [0.20, 0.80, 0, 0, 0, 0],  # Chickenpox, referred as Mpox (false positive)
        [0.05, 0.95, 0, 0, 0, 0],  # Chickenpox, correct
        [0.00, 0.0, 0.0, 0.0, 0.0, 1.0],  # Healthy, correct
    ])
    y = np.array([0, 0, 0, 0, 1, 1, 5])
    m = screening_metrics(probs, y, CLASSES, SCREEN, CAL)
    assert m["threshold"] == 0.2 and m["abstain_threshold"] == 0.6
    assert (m["sensitivity"]["k"], m["sensitivity"]["n"]) == (2, 4)
    assert (m["specificity"]["k"], m["specificity"]["n"]) == (2, 3)
    assert m["referral_rate"] == pytest.approx(3 / 7)
    assert m["total_referral_rate"] == pytest.approx(4 / 7)
    assert m["target_referred_any"]["value"] == pytest.approx(3 / 4)
    assert m["n_target_missed"] == 1 and m["ppv"] == pytest.approx(2 / 3)
    cm = m["decision_confusion"]
    assert cm["columns"] == ["Chickenpox", "Measles", "Cowpox", "HFMD", "Healthy", "possible Mpox", "uncertain"]
    assert cm["matrix"][0] == [0, 0, 0, 0, 1, 2, 1]
    assert cm["matrix"][1] == [1, 0, 0, 0, 0, 1, 0]
    for key in ("sensitivity", "specificity"):
        ci = m[key]
        assert ci["low"] <= ci["value"] <= ci["high"] and ci["wilson_low"] <= ci["value"] <= ci["wilson_high"]
    assert 0 <= m["roc_auc"] <= 1


def test_degenerate_bootstrap_interval_is_replaced_by_wilson():
    from mpoxscope.engine.screening import with_ci

    assert with_ci({"value": 1.0, "low": 1.0, "high": 1.0, "k": 3, "n": 3, "wilson_low": 0.4385,
                    "wilson_high": 1.0}) == "100.0 % [43.9, 100.0 Wilson] (3/3)"
    assert with_ci({"value": 0.5, "low": 0.2, "high": 0.8, "k": 5, "n": 10, "wilson_low": 0.24,
                    "wilson_high": 0.76}) == "50.0 % [20.0, 80.0] (5/10)"


def test_test_data_never_moves_the_threshold():
    pv, yv = _probs(150, seed=1)
    block = fit_screening(pv, yv, CLASSES)
    pt, yt = _probs(90, seed=2)
    a = screening_metrics(pt, yt, CLASSES, block)
    pt2 = pt.copy()
    pt2[:, 0] = np.where(yt == 0, 0.001, 0.999)  # the worst possible test scores for Mpox
    pt2 /= pt2.sum(1, keepdims=True)
    b = screening_metrics(pt2, yt, CLASSES, block)
    assert a["threshold"] == b["threshold"] == block["threshold"]
    assert b["sensitivity"]["value"] < a["sensitivity"]["value"]  # the test result changes, the rule does not


# ----- cross-validation: pooled thresholds -----------------------------------------------------------------------

def _fp(names, mpox, targets):
    p = np.zeros((len(names), 6))
    p[:, 0] = mpox
    p[:, 5] = 1 - np.asarray(mpox)
    return FoldPredictions(list(names), p, np.asarray(targets))


def test_pooled_thresholds_exclude_the_folds_test_images():
    # fold1's validation holds x.jpg, an Mpox photo with a very low score that is in fold2's test part.
    val = {"fold1": _fp(["a.jpg", "b.jpg", "x.jpg", "n1.jpg"], [0.9, 0.8, 0.01, 0.3], [0, 0, 0, 5]),
           "fold2": _fp(["c.jpg", "d.jpg", "n2.jpg"], [0.7, 0.6, 0.2], [0, 0, 5])}
    tests = {"fold1": {"c.jpg", "t1.jpg"}, "fold2": {"x.jpg", "t2.jpg"}}
    out = pooled_thresholds(val, tests, CLASSES, "Mpox", 1.0)
    # fold2: x.jpg left out -> lowest remaining Mpox score 0.6; fold1: c.jpg left out, x.jpg kept -> 0.01
    assert out["fold2"]["threshold"] == 0.6 and out["fold2"]["n_excluded"] == 1
    assert out["fold2"]["n_pooled"] == 6 and out["fold2"]["n_pooled_target"] == 4
    assert out["fold1"]["threshold"] == 0.01 and out["fold1"]["n_excluded"] == 1
    with pytest.raises(MpoxscopeError, match="no test images"):
        pooled_thresholds(val, {"fold1": set()}, CLASSES)


def _write_predictions(path: Path, names, probs, targets) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["filename", "true", "predicted", "confidence", *CLASSES])
    for n, p, t in zip(names, probs, targets):
        w.writerow([n, CLASSES[t], CLASSES[int(np.argmax(p))], f"{p.max():.4f}", *(f"{v:.4f}" for v in p)])
    path.write_text(buf.getvalue())


def make_cv_output(root: Path, n_folds: int = 3, seed: int = 0) -> Path:
    """A cv output folder as `mpoxscope cv` lays it out, with synthetic predictions (MSLD-style names)."""
    rng = np.random.default_rng(seed)
    names = [f"{c[:3].upper()}_{i // 2:02d}_{i % 2 + 1:02d}.jpg" for c in CLASSES for i in range(30)]  # 2/patient
    y = np.repeat(np.arange(6), 30)
    order = rng.permutation(len(names))
    for f in range(n_folds):
        fold = root / f"fold{f + 1}"
        # validation: 15 images of the next fold's test part (to be left out there) and 20 in no test part
        test_ix, val_ix = order[f::n_folds][:40], order[(f + 1) % n_folds::n_folds][25:]
        for split, ix in (("evaluation", test_ix), ("validation", val_ix)):
            p, _ = _probs(len(ix), seed=seed * 10 + f * 2 + (split == "evaluation"))
            logits = np.log(p)
            logits[np.arange(len(ix)), y[ix]] += 1.5
            p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
            _write_predictions(fold / split / "predictions.csv", [names[i] for i in ix], p, y[ix])
        (fold / "run").mkdir(parents=True)
        (fold / "run" / "model.json").write_text(json.dumps({"calibration": {"abstain_threshold": 0.4}}))
    return root


def test_screen_cv_output_writes_reports_and_ignores_test_scores(tmp_path):
    out = make_cv_output(tmp_path / "cv")
    r = screen_cv_output(out, "Mpox", 0.9)
    assert [f["fold"] for f in r["per_fold"]] == ["fold1", "fold2", "fold3"]
    assert (out / "screening.json").is_file() and (out / "screening_roc_pr.png").stat().st_size > 5000
    md = (out / "screening.md").read_text()
    assert "pooled out-of-fold validation" in md and "| fold3 |" in md and "possible Mpox" in md
    p = r["pooled"]
    assert all(f["n_excluded"] == 15 for f in r["per_fold"])
    assert p["n"] == 120 and p["n_target"] == sum(f["test"]["n_target"] for f in r["per_fold"])
    assert p["sensitivity"]["resampled"].endswith("patients")
    thresholds = [f["threshold"] for f in r["per_fold"]]

    # Change every test score: the thresholds stay, only the test results move.
    for f in ("fold1", "fold2", "fold3"):
        path = out / f / "evaluation" / "predictions.csv"
        rows = list(csv.reader(io.StringIO(path.read_text())))
        for row in rows[1:]:
            row[4:] = ["0.0000"] * 5 + ["1.0000"]
        path.write_text("\n".join(",".join(row) for row in rows) + "\n")
    r2 = screen_cv_output(out, "Mpox", 0.9)
    assert [f["threshold"] for f in r2["per_fold"]] == thresholds
    assert r2["pooled"]["sensitivity"]["value"] == 0.0

    r3 = screen_cv_output(out, "Mpox", 0.5)
    assert all(b["threshold"] >= a for a, b in zip(thresholds, r3["per_fold"]))


def test_screen_command(tmp_path, capsys):
    out = make_cv_output(tmp_path / "cv")
    (out / "cv_summary.json").write_text(json.dumps({"per_fold": [{"fold": f"fold{i}"} for i in (1, 2, 3)]}))
    code = main(["screen", str(out), "--sensitivity", "0.95", "--out", str(tmp_path / "s")])
    text = capsys.readouterr().out
    assert code == 0 and "sensitivity" in text and "test" in text and "95.0 %" in text
    saved = json.loads((tmp_path / "s" / "screening.json").read_text())
    assert saved["target_sensitivity"] == 0.95 and saved["target_class"] == "Mpox"
    # Without --out: cv_summary.json and the screening section of cv_report.md are updated in place.
    (out / "cv_report.md").write_text("# cv\n\n## Screening: catch Mpox first\n\nold numbers\n\n## After\n\nkept\n")
    assert main(["screen", str(out), "--sensitivity", "0.8"]) == 0
    capsys.readouterr()
    report = (out / "cv_report.md").read_text()
    assert "old numbers" not in report and "## After\n\nkept" in report and "80.0 % Mpox sensitivity" in report
    assert json.loads((out / "cv_summary.json").read_text())["screening"]["target_sensitivity"] == 0.8
    with pytest.raises(SystemExit):
        main(["screen", str(out), "--sensitivity", "1.2"])
    assert "must be in (0, 1]" in capsys.readouterr().err
    # a class the cv does not have: refused before --out is made (it used to be made and marked first)
    assert main(["screen", str(out), "--screen-class", "Nope", "--out", str(tmp_path / "s2")]) == 2
    assert capsys.readouterr().err.count("\n") == 1 and not (tmp_path / "s2").exists()
    shutil.rmtree(out / "fold2" / "validation")
    assert main(["screen", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fold2/validation/predictions.csv: missing" in err


def test_cv_report_links_screening(tmp_path):
    from mpoxscope.config import TrainConfig
    from mpoxscope.engine.cv import cv_screening, screening_report_lines

    out = make_cv_output(tmp_path / "cv")
    logs: list[str] = []
    sc = cv_screening(out, ["fold1", "fold2", "fold3"], TrainConfig(), "synthetic protocol", logs.append)
    assert sc["target_class"] == "Mpox" and sc["sensitivity"]["n"] > 0
    assert any("synthetic protocol" in line and "sensitivity" in line for line in logs)
    lines = "\n".join(screening_report_lines(sc))
    assert "[screening.md](screening.md)" in lines and "specificity" in lines
    skipped = cv_screening(tmp_path / "cv", ["fold1", "fold9"], TrainConfig(), "p", logs.append)
    assert "skipped" in skipped and "fold9" in skipped["skipped"]


# ----- one photo: predict, API and page say the same -------------------------------------------------------------

def _photo_files(root: Path) -> list[Path]:
    from PIL import Image

    rng = np.random.default_rng(3)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(3):
        arr = (rng.random((96, 128, 3)) * 255).astype(np.uint8)
        arr[20:70, 30:90] = (190 - 40 * i, 60 + 50 * i, 70)  # a "lesion" of a different colour each
        path = root / f"photo{i}.png"
        Image.fromarray(arr).save(path)
        paths.append(path)
    return paths


def _node_view(body: dict) -> dict:
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js not installed: cannot run the page's decision.js")
    script = ("const d = require(process.argv[1]); let s = ''; process.stdin.on('data', c => s += c);"
              "process.stdin.on('end', () => process.stdout.write(JSON.stringify(d.view(JSON.parse(s)))));")
    proc = subprocess.run([node, "-e", script, str(STATIC / "decision.js")], input=json.dumps(body),
                          capture_output=True, text=True, timeout=30, check=True)
    return json.loads(proc.stdout)


def test_predict_api_and_page_give_the_same_decision(tiny_run, tmp_path, capsys):
    from fastapi.testclient import TestClient

    from mpoxscope.engine.predict import Predictor
    from mpoxscope.serve import create_app

    photos = _photo_files(tmp_path / "photos")
    probs = Predictor.from_run(tiny_run, device="cpu").predict_paths(photos)
    mpox = [r.probabilities["Mpox"] for r in probs]
    # A threshold between the photos' P(Mpox): at least one is referred, at least one is not.
    lo, hi = sorted(mpox)[0], sorted(mpox)[-1]
    assert hi > lo
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    meta = json.loads((run / "model.json").read_text())
    meta["screening"] = {"target_class": "Mpox", "threshold": (lo + hi) / 2, "target_sensitivity": 0.9,
                         "source": "test"}
    meta["calibration"] = {"temperature": 1.0, "abstain_threshold": 0.05}  # untrained head: below 1/6 ~ 0.17
    (run / "model.json").write_text(json.dumps(meta))

    assert main(["predict", str(run), *map(str, photos), "--device", "cpu"]) == 0
    cli = json.loads(capsys.readouterr().out)
    assert main(["predict", str(run), *map(str, photos), "--device", "cpu", "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    kinds = {r["decision"]["kind"] for r in cli}
    assert kinds == {"refer_target", "class"}, kinds
    with TestClient(create_app(run, device="cpu")) as client:
        info = client.get("/api/model").json()
        assert info["screening"]["threshold"] == pytest.approx((lo + hi) / 2)
        for path, c, row in zip(photos, cli, rows):
            body = client.post("/api/predict", files={"file": (path.name, path.read_bytes(), "image/png")}).json()
            assert body["decision"] == c["decision"]
            assert row["decision"] == c["decision"]["kind"] and row["decision_text"] == c["decision"]["text"]
            page = _node_view(body)
            assert page["headline"] == c["decision"]["text"]
            assert page["alert"] == (c["decision"]["kind"] != "class")
            if c["decision"]["kind"] == "refer_target":
                assert c["decision"]["text"] == "possible Mpox — refer"
                assert "refer to a clinician" in body["message"] and "screening threshold" in body["message"]
            assert math.isclose(sum(body["probabilities"].values()), 1.0, abs_tol=1e-4)
    js = (STATIC / "app.js").read_text()
    assert "mpoxDecision.view(result)" in js and "decision.js" in (STATIC / "index.html").read_text()


def test_page_decision_without_a_decision_is_a_referral():
    view = _node_view({"top_class": "Mpox", "top_probability": 0.9})
    assert view["alert"] and "refer to a clinician" in view["headline"]


def test_service_rejects_malformed_screening_at_start(tiny_run, tmp_path):
    from mpoxscope.serve import create_app

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    meta = json.loads((run / "model.json").read_text())
    meta["screening"] = {"target_class": "Smallpox", "threshold": 0.2}
    (run / "model.json").write_text(json.dumps(meta))
    with pytest.raises(MpoxscopeError, match="screening.target_class"):
        create_app(run, device="cpu")


def test_evaluate_reports_screening(tiny_run, synthetic_root, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    meta = json.loads((run / "model.json").read_text())
    meta["screening"] = {"target_class": "Mpox", "threshold": 0.15, "target_sensitivity": 0.9, "source": "test"}
    (run / "model.json").write_text(json.dumps(meta))
    code = main(["evaluate", str(run), str(synthetic_root), "--out", str(tmp_path / "ev"), "--split-file", "none",
                 "--fold", "2", "--split", "validation", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    sm = m["screening"]
    assert sm["threshold"] == 0.15 and sm["n"] == m["n_images"]
    assert "threshold chosen on the run's validation part" in sm["protocol"]
    assert sum(map(sum, sm["decision_confusion"]["matrix"])) == m["n_images"]
    report = (tmp_path / "ev" / "report.md").read_text()
    assert "## Screening: catch Mpox first" in report and "Mpox sensitivity" in report
    assert (tmp_path / "ev" / "screening_roc_pr.png").stat().st_size > 5000


def test_card_screening_section():
    from mpoxscope.card.card import build_card

    pv, yv = _probs(150, seed=4)
    block = fit_screening(pv, yv, CLASSES, source="MSLD v2.0, fold1, validation")
    pt, yt = _probs(60, seed=5)
    metrics = {"protocol": "MSLD v2.0, fold1, test", "accuracy": 0.5,
               "screening": {**screening_metrics(pt, yt, CLASSES, block), "protocol": "MSLD v2.0, fold1, test"}}
    card = build_card({"classes": CLASSES, "screening": block}, metrics, screening_png="eval/screening_roc_pr.png")
    section = card[card.index("## Screening: catch Mpox first"):]
    assert f"{block['threshold']:.4f}"[:5] in section and "MSLD v2.0, fold1, validation" in section
    assert "Mpox sensitivity (referred as possible Mpox)" in section and "fold1, test" in section
    assert "![Mpox vs rest ROC and precision-recall](eval/screening_roc_pr.png)" in section
    assert "| true \\ decision |" in section
    assert "Screening rule: not recorded" in build_card({"classes": CLASSES}, None)
    assert "Test screening results: not recorded" in build_card({"classes": CLASSES, "screening": block}, None)


def test_predict_non_finite_is_an_error_with_an_uncertain_decision(tiny_run, tmp_path, capsys, monkeypatch):
    from mpoxscope.engine.predict import Predictor

    photo = _photo_files(tmp_path / "photos")[0]
    monkeypatch.setattr(Predictor, "predict_images",
                        lambda self, images, batch_size=16: np.full((len(images), len(self.classes)), np.nan))
    assert main(["predict", str(tiny_run), str(photo), "--device", "cpu"]) == 1
    out = json.loads(capsys.readouterr().out)[0]
    assert out["label"] is None and "non-finite" in out["error"]
    assert out["decision"]["kind"] == "uncertain" and "refer to a clinician" in out["decision"]["text"]


def test_vectorised_patient_bootstrap_matches_the_general_one():
    from mpoxscope.engine.screening import _proportions
    from mpoxscope.engine.uncertainty import bootstrap_ci

    rng = np.random.default_rng(7)
    groups = np.repeat(np.arange(150), 2)
    is_t = np.repeat(rng.random(150) < 0.3, 2)
    flagged = np.where(is_t, rng.random(300) < 0.85, rng.random(300) < 0.2)
    mine = _proportions(flagged, flagged, is_t, groups.tolist(), seed=0)["sensitivity"]
    ref = bootstrap_ci(lambda f, t: (f & t).sum() / t.sum(), flagged, is_t, groups=groups, seed=1)
    assert mine["resampled"] == "150 patients" and mine["value"] == pytest.approx(ref["value"])
    assert abs(mine["low"] - ref["low"]) < 0.03 and abs(mine["high"] - ref["high"]) < 0.03
