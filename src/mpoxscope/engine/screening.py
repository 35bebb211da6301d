"""Screening mode: catch one class (Mpox by default) first, at a sensitivity chosen on validation data.

Argmax over six classes treats "Mpox called Healthy" and "Measles called Chickenpox" as equally bad; a screening
programme does not. This module adds a decision rule beside argmax, applied the same way by ``predict``, the web
API, the page, ``evaluate``, ``cv`` and the model card (:func:`decide`):

1. ``P(target) >= threshold``  -> ``refer_target``: "possible Mpox — refer";
2. else top probability ``< abstain threshold`` (the calibration block, 0.5 without one) -> ``uncertain``:
   "uncertain — refer to a clinician";
3. else the top class; a top class equal to the target is also reported as "possible Mpox — refer", since a
   screening tool must never name the target disease without referring;
4. non-finite probabilities are never a class: ``uncertain``.

The threshold is the largest one whose validation sensitivity reaches the target *with 95 % confidence*
(:func:`choose_threshold` with ``confidence``): the one-sided lower bound of a patient-level bootstrap of the
validation sensitivity must reach the target. Largest threshold = fewest referrals. Why not the point estimate
(``confidence=None``, the k-th largest validation score): validation predictions come from the checkpoint, views
and calibration chosen on that same validation part, so they are optimistic, and 25–60 target photos from a
handful of patients leave the point estimate noisy; on MSLD's official folds the point rule chosen for 90 % gave
80.8 % on the pooled test parts. A screening programme wants the target met, so the margin for the validation
set's size is taken on the safe side. With several folds, :func:`pooled_thresholds` pools every fold's out-of-fold
validation predictions, leaving out the images in the fold's own test part, so the threshold is not fitted to 30
photos and never sees the test images it is measured on.

Arrays: ``probs`` (N, K) class probabilities, ``targets`` (N,) class indices, ``scores`` (N,) P(target).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mpoxscope.data.classes import canonical_class
from mpoxscope.engine import rundir
from mpoxscope.errors import MpoxscopeError

#: Abstain threshold used when a run has no fitted calibration (the web service's long-standing default): with
#: six classes a top probability under one half means the model spreads its belief over several diagnoses.
DEFAULT_ABSTAIN_THRESHOLD = 0.5
DEFAULT_TARGET_CLASS = "Mpox"
DEFAULT_SENSITIVITY = 0.90
#: Confidence with which the target sensitivity must be met on validation (one-sided bootstrap lower bound).
DEFAULT_CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 2000
UNCERTAIN_LABEL = "uncertain"
UNCERTAIN_TEXT = "uncertain — refer to a clinician"
THRESHOLD_SELECTION_POOLED = ("pooled out-of-fold validation predictions of all folds, excluding the images in the "
                              "fold's own test part")


@dataclass(frozen=True)
class Decision:
    """What a user is told about one photo. ``kind``: "refer_target" | "uncertain" | "class"; ``label``: a short
    name ("possible Mpox", "uncertain" or the class); ``text``: the sentence shown by CLI, API and page."""

    kind: str
    label: str
    text: str


def refer_label(target: str) -> str:
    return f"possible {target}"


def refer_text(target: str) -> str:
    return f"possible {target} — refer"


# ----- threshold choice ------------------------------------------------------------------------------------------

def check_sensitivity(sensitivity: float, what: str = "sensitivity") -> float:
    """``sensitivity`` as a float in (0, 1]; a clear error otherwise."""
    try:
        s = float(sensitivity)
    except (TypeError, ValueError):
        raise MpoxscopeError(f"{what}: not a number: {sensitivity!r}") from None
    if not 0.0 < s <= 1.0:  # NaN fails this too
        raise MpoxscopeError(f"{what}: must be in (0, 1], got {sensitivity}")
    return s


def choose_threshold(scores: np.ndarray, is_target: np.ndarray, sensitivity: float,
                     confidence: float | None = None, groups: Sequence | None = None,
                     resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> float:
    """The largest threshold ``t`` whose sensitivity ``mean(scores[is_target] >= t)`` reaches ``sensitivity`` —
    as a point estimate (``confidence=None``), or with that one-sided ``confidence`` (e.g. 0.95).

    ``scores`` (N,) finite scores (e.g. P(target)); ``is_target`` (N,) booleans; ``sensitivity`` in (0, 1];
    ``groups`` (N,) patient of each case (default: each case its own patient). Point rule: with ``n`` target cases
    the rule must keep ``k = ceil(sensitivity * n)`` of them, so ``t`` is the k-th largest target score. Confident
    rule: ``t`` is the largest target score at which the ``1 - confidence`` quantile of the sensitivity over
    ``resamples`` bootstrap resamples of the target cases' patients (seeded, so the choice is reproducible) reaches
    ``sensitivity``; it keeps at least as many cases as the point rule. Largest ``t`` = fewest non-target cases
    flagged. Non-target scores do not move ``t``; they only decide its cost.

    >>> choose_threshold(np.array([0.1, 0.2, 0.3, 0.4, 0.9]), np.array([1, 1, 1, 1, 0], bool), 0.75)
    0.2
    """
    s = check_sensitivity(sensitivity)
    x = np.asarray(scores, dtype=np.float64)
    y = np.asarray(is_target)
    if x.ndim != 1 or y.shape != x.shape:
        raise MpoxscopeError(f"scores and is_target must be (N,) arrays of equal length, got {x.shape} and "
                             f"{y.shape}")
    if not np.isfinite(x).all():
        raise MpoxscopeError("scores: contains NaN or infinite values")
    order = np.argsort(-x[y.astype(bool)], kind="stable")
    pos = x[y.astype(bool)][order]
    if len(pos) == 0:
        raise MpoxscopeError("no cases of the target class to choose a screening threshold on")
    if confidence is None:
        # 1e-9: 0.9 * 30 is 27.000000000000004 in floating point and must still mean 27 cases.
        k = max(1, math.ceil(s * len(pos) - 1e-9))
        return float(pos[k - 1])
    g = np.asarray(groups if groups is not None else np.arange(len(x)))
    if g.shape != x.shape:
        raise MpoxscopeError(f"groups: {len(g)} labels for {len(x)} cases")
    lower = _sensitivity_lower_bounds(pos, g[y.astype(bool)][order], check_confidence(confidence), resamples,
                                      seed)
    return float(pos[int(np.argmax(lower >= s - 1e-9))])  # the last case always reaches 1.0, so one exists


def check_confidence(confidence: float) -> float:
    """``confidence`` as a float in [0.5, 1); a clear error otherwise."""
    try:
        c = float(confidence)
    except (TypeError, ValueError):
        raise MpoxscopeError(f"confidence: not a number: {confidence!r}") from None
    if not 0.5 <= c < 1.0:
        raise MpoxscopeError(f"confidence: must be in [0.5, 1), got {confidence}")
    return c


def _sensitivity_lower_bounds(pos: np.ndarray, groups: np.ndarray, confidence: float, resamples: int,
                              seed: int) -> np.ndarray:
    """(n,) one-sided lower bounds of the sensitivity at each threshold ``pos[j]`` (``pos`` sorted descending).

    Each resample draws patients with replacement; a case counts as often as its patient was drawn. The
    sensitivity at ``pos[j]`` is the drawn weight of cases scoring at least ``pos[j]`` (ties included) over all
    drawn weight, and its bound the ``1 - confidence`` quantile over resamples.
    """
    patients, index = np.unique(groups.astype(str), return_inverse=True)
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(len(patients), np.full(len(patients), 1 / len(patients)), size=resamples)
    weights = counts[:, index].astype(np.float64)  # (resamples, n)
    kept = np.cumsum(weights, axis=1)
    last_of_tie = np.searchsorted(-pos, -pos, side="right") - 1  # a threshold keeps every case tied with it
    sens = kept[:, last_of_tie] / np.maximum(kept[:, -1:], 1e-12)
    return np.quantile(sens, 1 - confidence, axis=0)


def resolve_target_class(name: str, classes: Sequence[str]) -> int:
    """Index of ``name`` in ``classes``, accepting the data loader's aliases (Monkeypox, MKP -> Mpox)."""
    wanted = canonical_class(str(name))
    canon = [canonical_class(str(c)) for c in classes]
    if wanted not in canon:
        raise MpoxscopeError(f"screening class {name!r} is not one of the model's classes ({', '.join(classes)})")
    return canon.index(wanted)


def _check_probs(probs: Any, targets: Any, classes: Sequence[str], what: str) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(targets, dtype=np.int64)
    if p.ndim != 2 or p.shape[1] != len(classes):
        raise MpoxscopeError(f"{what}: expected an (N, {len(classes)}) probability array, got shape {p.shape}")
    if y.shape != (len(p),):
        raise MpoxscopeError(f"{what}: {len(p)} rows but targets have shape {y.shape}")
    if len(y) and (y.min() < 0 or y.max() >= len(classes)):
        raise MpoxscopeError(f"{what}: target outside 0..{len(classes) - 1}")
    if not np.isfinite(p).all():
        raise MpoxscopeError(f"{what}: contains NaN or infinite probabilities")
    return p, y


def fit_screening(val_probs: np.ndarray, val_targets: np.ndarray, classes: list[str], target_class: str = "Mpox",
                  sensitivity: float = 0.90, source: str = "", confidence: float | None = DEFAULT_CONFIDENCE,
                  groups: Sequence | None = None) -> dict:
    """The ``"screening"`` block of ``model.json``, chosen on validation predictions only.

    ``val_probs`` (N, K) calibrated probabilities (what the predictor outputs), ``val_targets`` (N,), ``groups``
    (N,) the patients (for the bootstrap behind ``confidence``; see :func:`choose_threshold`). The validation
    numbers describe the fit of the threshold rule ``P(target) >= threshold`` alone, on the same data it was chosen
    on; ``validation_referral_rate`` is the share of all validation cases it flags as the target.
    """
    p, y = _check_probs(val_probs, val_targets, classes, "validation probabilities")
    idx = resolve_target_class(target_class, classes)
    scores, is_t = p[:, idx], y == idx
    t = choose_threshold(scores, is_t, sensitivity, confidence, groups)
    flagged = scores >= t
    return {
        "target_class": str(classes[idx]),
        "target_sensitivity": float(sensitivity),
        "confidence": confidence,
        "threshold": t,
        "validation_sensitivity": float(flagged[is_t].mean()),
        "validation_specificity": float((~flagged[~is_t]).mean()) if (~is_t).any() else None,
        "validation_referral_rate": float(flagged.mean()),
        "n_validation_target": int(is_t.sum()),
        "n_validation": len(y),
        "source": source,
    }


# ----- the decision ----------------------------------------------------------------------------------------------

def check_screening(screening: Any, classes: Sequence[str]) -> tuple[int, float] | None:
    """(target index, threshold) of a ``model.json`` screening block, None when absent; a one-line error naming
    the field when it is malformed."""
    if screening is None:
        return None
    if not isinstance(screening, Mapping):
        raise MpoxscopeError(f"model.json: screening must be an object, got {type(screening).__name__}")
    try:
        t = float(screening.get("threshold"))
    except (TypeError, ValueError):
        raise MpoxscopeError(f"model.json: screening.threshold is not a number: {screening.get('threshold')!r}",
                             ) from None
    if not 0.0 <= t <= 1.0:  # NaN fails too
        raise MpoxscopeError(f"model.json: screening.threshold must be in [0, 1], got {t}")
    try:
        idx = resolve_target_class(str(screening.get("target_class", DEFAULT_TARGET_CLASS)), classes)
    except MpoxscopeError as e:
        raise MpoxscopeError(f"model.json: screening.target_class: {e}") from None
    return idx, t


def abstain_threshold_of(calibration: Any, default: float = DEFAULT_ABSTAIN_THRESHOLD) -> float:
    """The calibrated ``abstain_threshold``, or ``default`` when the run has none."""
    value = calibration.get("abstain_threshold") if isinstance(calibration, Mapping) else None
    if value is None:
        return float(default)
    try:
        t = float(value)
    except (TypeError, ValueError):
        raise MpoxscopeError(f"model.json: calibration.abstain_threshold is not a number: {value!r}") from None
    if not 0.0 <= t <= 1.0:
        raise MpoxscopeError(f"model.json: calibration.abstain_threshold must be in [0, 1], got {t}")
    return t


def decide(probs: np.ndarray, classes: Sequence[str], calibration: dict | None, screening: dict | None,
           default_abstain: float = DEFAULT_ABSTAIN_THRESHOLD) -> Decision:
    """The decision for one photo's probabilities ``probs`` (K,), by the rule in the module docstring."""
    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    if p.shape != (len(classes),) or not np.isfinite(p).all():
        return Decision("uncertain", UNCERTAIN_LABEL,
                        UNCERTAIN_TEXT + " (the model gave no valid probabilities for this photo)")
    abstain_t = abstain_threshold_of(calibration, default_abstain)
    scr = check_screening(screening, classes)
    k = int(np.argmax(p))
    if scr is not None and p[scr[0]] >= scr[1]:
        return _refer(classes[scr[0]])
    if p[k] < abstain_t:
        return Decision("uncertain", UNCERTAIN_LABEL, UNCERTAIN_TEXT)
    if scr is not None and k == scr[0]:  # never name the screened disease without referring
        return _refer(classes[k])
    return Decision("class", str(classes[k]), str(classes[k]))


def _refer(target: str) -> Decision:
    return Decision("refer_target", refer_label(target), refer_text(target))


def decide_all(probs: np.ndarray, classes: Sequence[str], calibration: dict | None, screening: dict | None,
               default_abstain: float = DEFAULT_ABSTAIN_THRESHOLD) -> list[Decision]:
    """:func:`decide` for every row of ``probs`` (N, K)."""
    return [decide(row, classes, calibration, screening, default_abstain) for row in np.asarray(probs)]


# ----- cross-validation: pooled thresholds -----------------------------------------------------------------------

@dataclass
class FoldPredictions:
    """One fold's predictions on one split: ``names`` (N,) image file names, ``probs`` (N, K), ``targets`` (N,)."""

    names: list[str]
    probs: np.ndarray
    targets: np.ndarray


def pooled_thresholds(fold_val_predictions: Mapping[str, FoldPredictions], fold_test_sets: Mapping[str, set[str]],
                      classes: Sequence[str], target_class: str = DEFAULT_TARGET_CLASS,
                      sensitivity: float = DEFAULT_SENSITIVITY,
                      confidence: float | None = DEFAULT_CONFIDENCE) -> dict[str, dict]:
    """Per fold, the threshold chosen on the pooled validation predictions of all folds, leaving out every
    prediction of an image in that fold's test part (``fold_test_sets[fold]``: file names). With
    ``confidence``, the bootstrap resamples patients (from the file names), so an image that sits in several
    folds' validation parts moves with its patient.

    Each fold's validation predictions come from that fold's own model, which never trained on them, so the pool
    is out-of-fold. Returns ``{fold: {"threshold", "n_pooled", "n_pooled_target", "n_excluded"}}``.
    """
    idx = resolve_target_class(target_class, classes)
    parts = {f: _check_probs(v.probs, v.targets, classes, f"{f} validation predictions")
             for f, v in fold_val_predictions.items()}
    out: dict[str, dict] = {}
    for fold in fold_val_predictions:
        if fold not in fold_test_sets:
            raise MpoxscopeError(f"{fold}: no test images given for this fold")
        test = fold_test_sets[fold]
        scores, is_t, names, excluded = [], [], [], 0
        for other, v in fold_val_predictions.items():
            keep = np.array([n not in test for n in v.names], dtype=bool)
            excluded += int((~keep).sum())
            p, y = parts[other]
            scores.append(p[keep, idx])
            is_t.append(y[keep] == idx)
            names += [n for n, k in zip(v.names, keep) if k]
        s, t = np.concatenate(scores), np.concatenate(is_t)
        out[fold] = {"threshold": choose_threshold(s, t, sensitivity, confidence, patient_groups(names)),
                     "n_pooled": len(s),
                     "n_pooled_target": int(t.sum()), "n_excluded": excluded}
    return out


# ----- metrics ---------------------------------------------------------------------------------------------------

def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float | None, float | None]:
    """Wilson score 95 % interval of a proportion k/n (stays sensible at 0/n and n/n, where a bootstrap interval
    collapses to a point)."""
    if n == 0:
        return None, None
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def _proportions(flagged: np.ndarray, referred: np.ndarray, is_t: np.ndarray, groups: Sequence | None,
                 seed: int) -> dict[str, dict]:
    """Sensitivity, specificity and target-referred-either-way, each with its 95 % percentile bootstrap
    interval (resampling patients when ``groups`` are known, else images) and its Wilson interval.

    The cluster bootstrap of :func:`mpoxscope.engine.uncertainty.bootstrap_ci`, vectorised: these statistics
    are ratios of per-patient counts, so one resample is a multinomial count of patients times the per-patient
    count table (2000 resamples of 500 patients in milliseconds instead of seconds).
    """
    n = len(flagged)
    _, gi = np.unique(np.asarray(groups if groups is not None else np.arange(n)).astype(str), return_inverse=True)
    g = int(gi.max()) + 1 if n else 0
    hits = {"sensitivity": (flagged, is_t), "specificity": (~flagged, ~is_t), "target_referred_any": (referred, is_t)}
    table = np.stack([np.bincount(gi, weights=(h & m).astype(float), minlength=g) for h, m in hits.values()] +
                     [np.bincount(gi, weights=m.astype(float), minlength=g) for _, m in hits.values()], axis=1)
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(g, np.full(g, 1.0 / g), size=BOOTSTRAP_RESAMPLES) if g else np.zeros((0, 0))
    sums = counts @ table if g else np.zeros((0, 6))
    out = {}
    for i, (name, (hit, mask)) in enumerate(hits.items()):
        k, m = int((hit & mask).sum()), int(mask.sum())
        with np.errstate(invalid="ignore", divide="ignore"):
            stats = sums[:, i] / sums[:, i + 3]
        stats = stats[np.isfinite(stats)]
        lo, hi = ((float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))) if m and len(stats)
                  else (None, None))
        wlo, whi = wilson_interval(k, m)
        out[name] = {"value": k / m if m else None, "low": lo, "high": hi, "k": k, "n": m,
                     "wilson_low": wlo, "wilson_high": whi,
                     "resampled": f"{g} patients" if groups is not None and g < n else f"{n} images"}
    return out


def decision_metrics(decisions: Sequence[Decision], targets: np.ndarray, classes: Sequence[str], target_idx: int,
                     groups: Sequence | None = None, seed: int = 0) -> dict:
    """Screening metrics of final decisions against true classes ``targets`` (N,).

    sensitivity: target cases referred as the target; specificity: other cases not referred as the target;
    referral_rate: all cases referred as the target; total_referral_rate: referred as the target or uncertain
    (every photo a clinician must see); target_referred_any: target cases sent to a clinician either way.
    ``groups`` (N,): the patient of each image, for a patient-level bootstrap.
    """
    y = np.asarray(targets, dtype=np.int64)
    kinds = np.array([d.kind for d in decisions])
    is_t = y == target_idx
    flagged = kinds == "refer_target"
    referred = flagged | (kinds == "uncertain")
    target = str(classes[target_idx])
    columns = [c for i, c in enumerate(classes) if i != target_idx] + [refer_label(target), UNCERTAIN_LABEL]
    col = {c: i for i, c in enumerate(columns)}
    matrix = np.zeros((len(classes), len(columns)), dtype=int)
    for d, t in zip(decisions, y):
        matrix[t, col[d.label]] += 1
    n = len(y)
    return {
        "n": n, "n_target": int(is_t.sum()),
        **_proportions(flagged, referred, is_t, groups, seed),
        "referral_rate": float(flagged.mean()) if n else None,
        "total_referral_rate": float(referred.mean()) if n else None,
        "ppv": float((flagged & is_t).sum() / flagged.sum()) if flagged.any() else None,
        "n_referred_target": int(flagged.sum()), "n_uncertain": int((kinds == "uncertain").sum()),
        "n_target_missed": int((is_t & ~referred).sum()),
        "decision_confusion": {"rows": list(map(str, classes)), "columns": columns, "matrix": matrix.tolist()},
    }


def curve_metrics(scores: np.ndarray, is_target: np.ndarray) -> dict:
    """Target-vs-rest ROC-AUC and average precision of ``scores`` (N,) (None when one side is empty)."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    is_t = np.asarray(is_target, dtype=bool)
    if is_t.all() or not is_t.any():
        return {"roc_auc": None, "average_precision": None}
    return {"roc_auc": float(roc_auc_score(is_t, scores)),
            "average_precision": float(average_precision_score(is_t, scores))}


def screening_metrics(test_probs: np.ndarray, test_targets: np.ndarray, classes: list[str], screening: dict,
                      calibration: dict | None = None, groups: Sequence | None = None, seed: int = 0) -> dict:
    """Screening results of a run on test data: the final decisions of :func:`decide` (with the run's abstain
    threshold from ``calibration``), sensitivity and specificity with 95 % bootstrap intervals (2000 resamples, of
    patients when ``groups`` (N,) are given; Wilson intervals beside them), referral rates, the decision confusion
    matrix, ROC-AUC and average precision. The threshold comes from ``screening`` (validation); the test data
    never changes it."""
    p, y = _check_probs(test_probs, test_targets, classes, "test probabilities")
    checked = check_screening(screening, classes)
    if checked is None:
        raise MpoxscopeError("no screening block to evaluate")
    idx, t = checked
    out = {"target_class": str(classes[idx]), "threshold": t,
           "target_sensitivity": screening.get("target_sensitivity"),
           "abstain_threshold": abstain_threshold_of(calibration),
           **decision_metrics(decide_all(p, classes, calibration, screening), y, classes, idx, groups, seed)}
    out.update(curve_metrics(p[:, idx], y == idx))
    return out


# ----- plots -----------------------------------------------------------------------------------------------------

def curves_png(scores: np.ndarray, is_target: np.ndarray, metrics: dict, title: str) -> bytes:
    """ROC and precision-recall curves of target-vs-rest ``scores`` (N,), the operating point of the final
    decisions in ``metrics`` (from :func:`decision_metrics`) marked on both; PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve, roc_curve

    is_t = np.asarray(is_target, dtype=bool)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 4.2))
    sens = metrics["sensitivity"]["value"]
    spec = metrics["specificity"]["value"]
    target = metrics.get("target_class", "target")
    if is_t.any() and not is_t.all():
        fpr, tpr, _ = roc_curve(is_t, scores)
        a1.plot(fpr, tpr, lw=1.5, label=f"ROC (AUC {metrics.get('roc_auc') or float('nan'):.3f})")
        prec, rec, _ = precision_recall_curve(is_t, scores)
        a2.plot(rec, prec, lw=1.5, label=f"PR (AP {metrics.get('average_precision') or float('nan'):.3f})")
        a2.axhline(is_t.mean(), ls=":", color="grey", lw=1, label=f"prevalence {is_t.mean():.2f}")
    a1.plot([0, 1], [0, 1], ls=":", color="grey", lw=1)
    if sens is not None and spec is not None:
        a1.plot([1 - spec], [sens], "o", color="C3", label=f"operating point: sens {sens:.2f}, spec {spec:.2f}")
    if sens is not None and metrics.get("ppv") is not None:
        a2.plot([sens], [metrics["ppv"]], "o", color="C3", label=f"operating point: PPV {metrics['ppv']:.2f}")
    a1.set(xlabel="1 - specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.02),
           title=f"{target} vs rest: ROC")
    a2.set(xlabel="recall (sensitivity)", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02),
           title=f"{target} vs rest: precision-recall")
    for a in (a1, a2):
        a.legend(loc="lower right" if a is a1 else "lower left", fontsize=8)
    fig.suptitle(title[:110], fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


# ----- Markdown --------------------------------------------------------------------------------------------------

def pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f} %"


def with_ci(d: dict) -> str:
    """``92.0 % [84.1, 97.5]`` (bootstrap) with k/n. Where the bootstrap interval collapses to a point (3 of 3
    cases: every resample gives 100 %), the Wilson interval is shown instead and marked."""
    if d.get("value") is None:
        return "n/a (no cases)"
    lo, hi, note = d.get("low"), d.get("high"), ""
    if lo is not None and lo == hi and d.get("wilson_low") is not None:
        lo, hi, note = d["wilson_low"], d["wilson_high"], " Wilson"
    ci = "" if lo is None else f" [{100 * lo:.1f}, {100 * hi:.1f}{note}]"
    return f"{100 * d['value']:.1f} %{ci} ({d['k']}/{d['n']})"


def rule_markdown(m: dict) -> str:
    """The decision rule of one run in words, with its thresholds."""
    target = m["target_class"]
    return (f"Decision rule: **{refer_text(target)}** when P({target}) ≥ {m['threshold']:.4f} (threshold chosen on "
            f"validation for {pct(m.get('target_sensitivity'))} {target} sensitivity); otherwise "
            f"**{UNCERTAIN_TEXT}** when the top probability is below {m['abstain_threshold']:.3f}; otherwise the "
            f"top class (a top class of {target} is also referred).")


def metrics_markdown(m: dict, image: str | None = None) -> list[str]:
    """Markdown lines for one set of screening metrics (from :func:`decision_metrics`, with ``target_class``)."""
    target = m["target_class"]
    lines = ["| screening metric (95 % bootstrap CI) | value |", "|---|---|",
             f"| {target} sensitivity (referred as possible {target}) | {with_ci(m['sensitivity'])} |",
             f"| specificity (others not referred as {target}) | {with_ci(m['specificity'])} |",
             f"| referral rate (referred as possible {target}) | {pct(m['referral_rate'])} |",
             f"| total referral rate (possible {target} or uncertain) | {pct(m['total_referral_rate'])} |",
             f"| {target} cases sent to a clinician either way | {with_ci(m['target_referred_any'])} |",
             f"| {target} cases missed (given another class) | {m['n_target_missed']} of {m['n_target']} |",
             f"| PPV of a {target} referral | {pct(m.get('ppv'))} |",
             f"| ROC-AUC / average precision ({target} vs rest) | {_f(m.get('roc_auc'))} / "
             f"{_f(m.get('average_precision'))} |"]
    if image:
        lines += ["", f"![{target} vs rest ROC and precision-recall]({image})"]
    cm = m["decision_confusion"]
    lines += ["", "Final decisions (rows true, columns decision):", "",
              "| true \\ decision | " + " | ".join(cm["columns"]) + " |", "|---" * (len(cm["columns"]) + 1) + "|"]
    for r, row in zip(cm["rows"], cm["matrix"]):
        lines.append(f"| {r} | " + " | ".join(str(v) for v in row) + " |")
    return lines


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


# ----- cross-validation outputs ----------------------------------------------------------------------------------

def read_predictions_csv(path: str | Path, classes: Sequence[str] | None = None) -> tuple[FoldPredictions,
                                                                                              list[str]]:
    """Read a ``predictions.csv`` (filename,true,predicted,confidence,<class probabilities...>)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise MpoxscopeError(f"{path}: cannot read ({e.strerror or e})") from None
    rows = list(csv.reader(io.StringIO(text)))
    if not rows or rows[0][:4] != ["filename", "true", "predicted", "confidence"] or len(rows[0]) < 6:
        raise MpoxscopeError(f"{path}: not a predictions file (expected columns filename,true,predicted,"
                             f"confidence,<class probabilities>)")
    header = rows[0][4:]
    if classes is not None and list(header) != list(classes):
        raise MpoxscopeError(f"{path}: classes {header} differ from {list(classes)}")
    index = {c: i for i, c in enumerate(header)}
    names, probs, targets = [], [], []
    for line_no, r in enumerate(rows[1:], start=2):
        if not r:
            continue
        if len(r) != len(rows[0]) or r[1] not in index:
            raise MpoxscopeError(f"{path}: line {line_no}: malformed row")
        try:
            probs.append([float(v) for v in r[4:]])
        except ValueError:
            raise MpoxscopeError(f"{path}: line {line_no}: probability is not a number") from None
        names.append(r[0])
        targets.append(index[r[1]])
    p = np.asarray(probs, dtype=np.float64).reshape(-1, len(header))
    return FoldPredictions(names, p, np.asarray(targets, dtype=np.int64)), list(header)


def patient_groups(names: Sequence[str]) -> list[str]:
    """The patient of each file name (``MKP_17_01.jpg`` -> ``MKP_17``); a name without one is its own group."""
    from mpoxscope.data.samples import patient_group

    return [patient_group(n) or n for n in names]


def _fold_dirs(cv_out: Path) -> list[Path]:
    """Fold folders in the order of ``cv_summary.json`` when there is one, else every folder with a test
    ``evaluation/predictions.csv``, sorted."""
    summary = cv_out / "cv_summary.json"
    if summary.is_file():
        from mpoxscope.fileio import read_json

        try:
            names = [str(r["fold"]) for r in read_json(summary)["per_fold"]]
        except (ValueError, KeyError, TypeError):
            raise MpoxscopeError(f"{summary}: not a cross-validation summary (no per_fold list)") from None
        return [cv_out / n for n in names]
    return sorted(d for d in cv_out.iterdir() if (d / rundir.EVALUATION / rundir.PREDICTIONS).is_file())


def _calibration_of(fold_dir: Path) -> dict | None:
    meta = fold_dir / rundir.CV_RUN / rundir.META
    if not meta.is_file():
        return None
    from mpoxscope.fileio import read_json

    try:
        cal = read_json(meta).get("calibration")
    except (ValueError, AttributeError):
        raise MpoxscopeError(f"{meta}: not a valid model.json") from None
    return cal if isinstance(cal, dict) else None


def selection_text(confidence: float | None) -> str:
    """How the cv thresholds were chosen, for reports."""
    rule = (f"the largest threshold whose validation sensitivity reaches the target with {confidence:.0%} confidence "
            "(one-sided patient-bootstrap lower bound)" if confidence else
            "the largest threshold whose validation sensitivity reaches the target (point estimate)")
    return f"{rule}, on {THRESHOLD_SELECTION_POOLED}"


def _read_cv_predictions(dirs: list[Path]) -> tuple[dict, dict, dict, list[str]]:
    """Validation and test predictions and the calibration block of every fold folder."""
    val, test, cal, classes = {}, {}, {}, None
    for d in dirs:
        for split, store in ((rundir.VALIDATION, val), (rundir.EVALUATION, test)):
            f = d / split / rundir.PREDICTIONS
            if not f.is_file():
                raise MpoxscopeError(f"{f}: missing (folds need validation and test predictions; rerun cv with "
                                     f"this version to write them)")
            store[d.name], header = read_predictions_csv(f, classes)
            classes = classes or header
        cal[d.name] = _calibration_of(d)
    assert classes is not None
    return val, test, cal, classes


def _own_threshold_result(val: FoldPredictions, test: FoldPredictions, classes: list[str], idx: int,
                          sensitivity: float, confidence: float | None, cal: dict | None, fold: str,
                          groups: list[str]) -> tuple[float, dict, list[Decision]] | None:
    """The fold's test decisions with the threshold of its own validation part (what a single run stores); None
    when that part holds no target case."""
    if not (val.targets == idx).any():
        return None
    own = fit_screening(val.probs, val.targets, classes, classes[idx], sensitivity, f"{fold} validation",
                        confidence, patient_groups(val.names))
    dec = decide_all(test.probs, classes, cal, own)
    m = decision_metrics(dec, test.targets, classes, idx, groups)
    return own["threshold"], {k: m[k] for k in ("sensitivity", "specificity", "referral_rate",
                                                "total_referral_rate")}, dec


def screen_cv_output(cv_out: str | Path, target_class: str = DEFAULT_TARGET_CLASS,
                     sensitivity: float = DEFAULT_SENSITIVITY, out: str | Path | None = None,
                     protocol: str | None = None, folds: Sequence[str] | None = None,
                     confidence: float | None = DEFAULT_CONFIDENCE) -> dict:
    """Screening results of a finished cross-validation from its prediction files alone (no model needed).

    Reads ``<fold>/validation/predictions.csv`` and ``<fold>/evaluation/predictions.csv`` of every fold (and the
    abstain threshold from ``<fold>/run/model.json``); chooses each fold's threshold on the pooled out-of-fold
    validation predictions without that fold's test images (:func:`pooled_thresholds`, with ``confidence``), with
    the threshold chosen on the fold's own validation part reported beside it; writes ``screening.json``,
    ``screening.md`` and ``screening_roc_pr.png`` to ``out`` (default ``cv_out``) and returns the JSON dict.
    ``folds``: fold folder names (default: those of ``cv_summary.json``, else every fold folder with test
    predictions).
    """
    cv_out = Path(cv_out)
    if not cv_out.is_dir():
        raise MpoxscopeError(f"{cv_out}: not a folder")
    sensitivity = check_sensitivity(sensitivity, "--sensitivity")
    confidence = check_confidence(confidence) if confidence else None
    dirs = [cv_out / f for f in folds] if folds is not None else _fold_dirs(cv_out)
    if not dirs:
        raise MpoxscopeError(f"{cv_out}: no fold folders with evaluation/predictions.csv (is this a cv output?)")
    protocol = protocol or _recorded_protocol(cv_out)
    val, test, cal, classes = _read_cv_predictions(dirs)
    idx = resolve_target_class(target_class, classes)
    target, how = classes[idx], selection_text(confidence)
    pooled = pooled_thresholds(val, {f: set(p.names) for f, p in test.items()}, classes, target, sensitivity,
                               confidence)
    per_fold, all_dec, all_own, own_missing = [], [], [], []
    for f in test:
        groups = patient_groups(test[f].names)
        block = {"target_class": target, "target_sensitivity": sensitivity, "threshold": pooled[f]["threshold"],
                 "source": how}
        dec = decide_all(test[f].probs, classes, cal[f], block)
        m = {"target_class": target, "threshold": pooled[f]["threshold"], "target_sensitivity": sensitivity,
             "abstain_threshold": abstain_threshold_of(cal[f]),
             **decision_metrics(dec, test[f].targets, classes, idx, groups),
             **curve_metrics(test[f].probs[:, idx], test[f].targets == idx)}
        own = _own_threshold_result(val[f], test[f], classes, idx, sensitivity, confidence, cal[f], f, groups)
        if own is None:
            own_missing.append(f)
        all_own += own[2] if own else []
        per_fold.append({"fold": f, **pooled[f], "own_threshold": own[0] if own else None,
                         "own_validation_n_target": int((val[f].targets == idx).sum()),
                         "test": m, "test_own_threshold": own[1] if own else None})
        all_dec += dec
    result = _pooled_result(test, classes, idx, sensitivity, confidence, all_dec, all_own, own_missing,
                            per_fold, (protocol or "cross-validation outputs in " + cv_out.name) +
                            f"; test parts pooled over {len(per_fold)} folds; threshold per fold: {how}")
    y, scores = _pooled_test(test, idx)
    if out is not None:  # a folder of its own: marked now, after every input was read and checked
        from mpoxscope.fileio import mark_output_dir

        mark_output_dir(out, "screen")
    _write_cv_screening(Path(out) if out is not None else cv_out, result, scores, y == idx)
    return result


def _recorded_protocol(cv_out: Path) -> str | None:
    if not (cv_out / "cv_summary.json").is_file():
        return None
    from mpoxscope.fileio import read_json

    recorded = read_json(cv_out / "cv_summary.json")
    return recorded.get("protocol") if isinstance(recorded, dict) else None


def _pooled_result(test: dict, classes: list[str], idx: int, sensitivity: float, confidence: float | None,
                   all_dec: list, all_own: list, own_missing: list[str], per_fold: list[dict],
                   protocol: str) -> dict:
    """The JSON of :func:`screen_cv_output`: per fold and pooled over the test parts."""
    y, scores = _pooled_test(test, idx)
    groups = [g for p in test.values() for g in patient_groups(p.names)]
    target = classes[idx]
    pooled_m = {"target_class": target, "target_sensitivity": sensitivity,
                **decision_metrics(all_dec, y, classes, idx, groups), **curve_metrics(scores, y == idx)}
    own_m = decision_metrics(all_own, y, classes, idx, groups) if not own_missing else None
    return {
        "protocol": protocol, "target_class": target, "target_sensitivity": sensitivity, "confidence": confidence,
        "classes": classes, "threshold_selection": selection_text(confidence),
        "ci": f"95 % percentile bootstrap, {BOOTSTRAP_RESAMPLES} resamples of {pooled_m['sensitivity']['resampled']} "
              f"(patients from MSLD file names; Wilson score intervals beside it in the JSON)",
        "per_fold": per_fold, "pooled": pooled_m,
        "pooled_own_threshold": {k: own_m[k] for k in ("sensitivity", "specificity", "referral_rate",
                                                       "total_referral_rate", "n_target_missed")} if own_m else
        {"unavailable": f"no {target} case in the validation part of {', '.join(own_missing)}"},
    }


def _pooled_test(test: dict, idx: int) -> tuple[np.ndarray, np.ndarray]:
    """Targets (N,) and target-class scores (N,) of every fold's test part, pooled in fold order."""
    return (np.concatenate([p.targets for p in test.values()]),
            np.concatenate([p.probs[:, idx] for p in test.values()]))


def _write_cv_screening(dest: Path, result: dict, scores: np.ndarray, is_target: np.ndarray) -> None:
    from mpoxscope.fileio import write_bytes, write_json, write_text

    write_json(dest / "screening.json", result)
    write_bytes(dest / "screening_roc_pr.png", curves_png(scores, is_target, result["pooled"],
                                                          f"pooled test parts, {len(result['per_fold'])} folds"))
    write_text(dest / "screening.md", cv_screening_markdown(result))


def cv_screening_markdown(r: dict) -> str:
    """``screening.md`` of :func:`screen_cv_output`."""
    target, p = r["target_class"], r["pooled"]
    lines = [f"# mpoxscope screening: catch {target} first", "", f"**Protocol:** {r['protocol']}  ",
             f"**Target:** {pct(r['target_sensitivity'])} {target} sensitivity; **CIs:** {r['ci']}", "",
             f"Decision rule per photo: **{refer_text(target)}** when P({target}) reaches the fold's threshold; "
             f"else **{UNCERTAIN_TEXT}** when the top probability is below the fold's calibrated abstain threshold "
             f"(0.5 without calibration); else the top class ({target} as top class is referred too).", "",
             f"Pooled test result: {target} sensitivity {with_ci(p['sensitivity'])}, specificity "
             f"{with_ci(p['specificity'])}, referral rate {pct(p['referral_rate'])} (with uncertain: "
             f"{pct(p['total_referral_rate'])}).", "",
             "## Per fold", "",
             f"Pooled threshold: {r.get('threshold_selection', THRESHOLD_SELECTION_POOLED)}. Own threshold: "
             "chosen the same way on the fold's own validation part only (what a single training run stores in "
             "model.json), shown for comparison.", "",
             "| fold | n test | n " + target + " | pooled threshold (n pooled, excluded) | sensitivity | specificity "
             "| referral rate | own threshold (n val " + target + ") | sensitivity | specificity |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for f in r["per_fold"]:
        m, o = f["test"], f["test_own_threshold"]
        own = (f"{f['own_threshold']:.4f} ({f['own_validation_n_target']}) | {pct(o['sensitivity']['value'])} | "
               f"{pct(o['specificity']['value'])}") if o else f"n/a (no {target} in validation) | | "
        lines.append(f"| {f['fold']} | {m['n']} | {m['n_target']} | {f['threshold']:.4f} ({f['n_pooled']}, "
                     f"{f['n_excluded']}) | {with_ci(m['sensitivity'])} | {with_ci(m['specificity'])} | "
                     f"{pct(m['referral_rate'])} | {own} |")
    o = r["pooled_own_threshold"]
    lines += ["", f"With each fold's own-validation threshold instead, pooled: sensitivity "
              f"{with_ci(o['sensitivity'])}, specificity {with_ci(o['specificity'])}, referral rate "
              f"{pct(o['referral_rate'])}." if "unavailable" not in o else
              f"Own-validation thresholds, pooled: not available ({o['unavailable']}).",
              "", "## Pooled over folds (pooled thresholds)", ""]
    lines += metrics_markdown(p, "screening_roc_pr.png")
    return "\n".join(lines) + "\n"


def cv_summary_entry(r: dict) -> dict:
    """The part of a :func:`screen_cv_output` result kept in cv_summary.json."""
    p = r["pooled"]
    return {"target_class": r["target_class"], "target_sensitivity": r["target_sensitivity"],
            "confidence": r.get("confidence"), "report": "screening.md",
            **{k: p[k] for k in ("sensitivity", "specificity", "referral_rate", "total_referral_rate",
                                 "n_target_missed")}}


def cv_report_lines(sc: dict | None) -> list[str]:
    """The screening section of cv_report.md: the pooled result and a link to screening.md."""
    if not sc:
        return []
    if "skipped" in sc:
        return ["", "## Screening", "", f"Not computed: {sc['skipped']}"]
    t = sc["target_class"]
    return ["", f"## Screening: catch {t} first", "",
            f"Threshold per fold chosen on pooled out-of-fold validation predictions (never the fold's test images) "
            f"for {pct(sc['target_sensitivity'])} {t} sensitivity"
            + (f", met with {sc['confidence']:.0%} confidence (patient-bootstrap lower bound)"
               if sc.get("confidence") else "") + ". Pooled test: sensitivity "
            f"{with_ci(sc['sensitivity'])}, specificity {with_ci(sc['specificity'])}, referral rate "
            f"{pct(sc['referral_rate'])} (with uncertain {pct(sc['total_referral_rate'])}). "
            "Per fold, confusion matrix of the decisions and curves: [screening.md](screening.md).", "",
            "![screening ROC and precision-recall](screening_roc_pr.png)"]


def refresh_cv_outputs(cv_out: str | Path, r: dict) -> bool:
    """After ``mpoxscope screen``: the new result goes into cv_summary.json and the screening section of
    cv_report.md (replaced in place, so no model code is imported). False when there is no cv_summary.json."""
    from mpoxscope.fileio import read_json, write_json, write_text

    cv_out = Path(cv_out)
    summary_file = cv_out / "cv_summary.json"
    if not summary_file.is_file():
        return False
    summary = read_json(summary_file)
    entry = cv_summary_entry(r)
    summary["screening"] = entry
    write_json(summary_file, summary)
    report = cv_out / "cv_report.md"
    if report.is_file():
        text = report.read_text(encoding="utf-8")
        section = "\n".join(cv_report_lines(entry))
        start = text.find("\n## Screening")
        if start < 0:
            text = text.rstrip("\n") + "\n" + section + "\n"
        else:
            end = text.find("\n## ", start + 1)
            text = text[:start] + section + (text[end:] if end >= 0 else "\n")
        write_text(report, text)
    return True
