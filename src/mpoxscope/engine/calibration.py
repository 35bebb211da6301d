"""Calibration on validation logits: temperature scaling, calibration error, a selective-prediction threshold.

Everything here is a pure function of arrays: ``logits`` (N, K) raw model outputs, ``probs`` (N, K) class
probabilities (rows sum to 1), ``targets`` (N,) integer class indices. Torch tensors are accepted too.

* :func:`fit_temperature` (Guo et al., 2017, "On Calibration of Modern Neural Networks"): one scalar
  ``T`` such that ``softmax(logits / T)`` minimises the negative log-likelihood. It never changes the
  predicted class.
* :func:`expected_calibration_error`: the gap between confidence and accuracy, averaged over confidence bins.
* :func:`choose_abstain_threshold`: the confidence below which the model should say "not sure, see a
  clinician", chosen so that the cases it keeps reach a target accuracy.
* :func:`calibrate`: all of the above as the ``"calibration"`` block of a run's ``model.json``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

from mpoxscope.errors import MpoxscopeError

#: Temperatures outside this range mean a broken model or a degenerate validation set, not calibration.
T_MIN, T_MAX = 0.05, 20.0


def _as_numpy(a: Any, dtype: type = np.float64) -> np.ndarray:
    if hasattr(a, "detach"):  # torch tensor, possibly on GPU / requiring grad
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=dtype)


def _check(scores: Any, targets: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert to (N, K) float64 and (N,) int64 arrays."""
    x = _as_numpy(scores)
    y = _as_numpy(targets, np.int64)
    if x.ndim != 2 or x.shape[1] < 2:
        raise MpoxscopeError(f"{what}: expected an (N, K) array with K >= 2, got shape {x.shape}")
    if y.ndim != 1 or len(y) != len(x):
        raise MpoxscopeError(f"{what}: {len(x)} rows but targets have shape {y.shape}")
    if len(x) == 0:
        raise MpoxscopeError(f"{what}: no samples (is the validation split empty?)")
    if not np.isfinite(x).all():
        raise MpoxscopeError(f"{what}: contains NaN or infinite values")
    if y.min() < 0 or y.max() >= x.shape[1]:
        raise MpoxscopeError(f"{what}: target outside 0..{x.shape[1] - 1}")
    return x, y


def nll(logits: Any, targets: Any, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``softmax(logits / temperature)``; logits (N, K), targets (N,)."""
    x, y = _check(logits, targets, "logits")
    return float(-log_softmax(x / temperature, axis=1)[np.arange(len(y)), y].mean())


def fit_temperature(logits: Any, targets: Any) -> float:
    """The temperature ``T`` in [0.05, 20] minimising the NLL of ``softmax(logits / T)``.

    logits (N, K), targets (N,). The NLL is convex in ``1/T``, hence unimodal in ``log T``, so a bounded
    scalar search on ``log T`` finds the optimum without tuning; the bounds keep a validation set the model
    classifies perfectly (optimum ``T -> 0``) or not at all from producing an absurd value.
    """
    x, y = _check(logits, targets, "logits")
    rows = np.arange(len(y))

    def objective(log_t: float) -> float:
        return float(-log_softmax(x * math.exp(-log_t), axis=1)[rows, y].mean())

    res = minimize_scalar(objective, bounds=(math.log(T_MIN), math.log(T_MAX)), method="bounded",
                          options={"xatol": 1e-5})
    t = float(np.clip(math.exp(res.x), T_MIN, T_MAX))
    # No scaling unless it helps: also covers a flat objective (perfectly separated logits, where every
    # small T gives NLL 0 in floating point and the search result would be arbitrary).
    return t if objective(math.log(t)) < objective(0.0) - 1e-12 else 1.0


def apply_temperature(logits: Any, temperature: float) -> np.ndarray:
    """(N, K) logits -> (N, K) probabilities ``softmax(logits / temperature)``."""
    return softmax(_as_numpy(logits) / temperature, axis=1)


@dataclass(frozen=True)
class ReliabilityBins:
    """Equal-width confidence bins for a reliability diagram; each array has ``n_bins`` entries.

    ``edges`` (n_bins + 1,); ``count`` samples per bin; ``confidence`` mean top-class probability and
    ``accuracy`` fraction correct in each bin (NaN where a bin is empty).
    """

    edges: np.ndarray
    count: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray

    def to_dict(self) -> dict[str, list]:
        return {k: [None if isinstance(v, float) and math.isnan(v) else v for v in np.asarray(a).tolist()]
                for k, a in asdict(self).items()}


def reliability_bins(probs: Any, targets: Any, n_bins: int = 15) -> ReliabilityBins:
    """Bin the top-class confidence of ``probs`` (N, K) into ``n_bins`` equal-width bins (lo, hi]."""
    p, y = _check(probs, targets, "probabilities")
    conf, correct = p.max(axis=1), (p.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # Bin i holds (edges[i], edges[i+1]]; a confidence of exactly 0 (impossible for K >= 2) would go to bin 0.
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / count
        acc = np.bincount(idx, weights=correct, minlength=n_bins) / count
    return ReliabilityBins(edges, count, mean_conf, acc)


def expected_calibration_error(probs: Any, targets: Any, n_bins: int = 15) -> float:
    """ECE: sum over confidence bins of (bin share) * |accuracy - mean confidence|.

    probs (N, K), targets (N,); equal-width bins on the top-class probability.
    """
    bins = reliability_bins(probs, targets, n_bins)
    used = bins.count > 0
    weights = bins.count[used] / bins.count.sum()
    return float(np.sum(weights * np.abs(bins.accuracy[used] - bins.confidence[used])))


@dataclass(frozen=True)
class AbstainChoice:
    """A confidence threshold: predictions with top probability ``< threshold`` are withheld (abstain).

    ``accuracy_kept`` and ``coverage`` (share of cases kept) are measured on the data the threshold was chosen
    on. ``target_reached`` is False when no threshold keeps ``min_coverage`` of the cases at
    ``target_accuracy``; the threshold is then the fallback described in :func:`choose_abstain_threshold`.
    """

    threshold: float
    accuracy_kept: float
    coverage: float
    n_kept: int
    target_accuracy: float
    min_coverage: float
    target_reached: bool


def choose_abstain_threshold(probs: Any, targets: Any, target_accuracy: float = 0.95,
                             min_coverage: float = 0.5) -> AbstainChoice:
    """The lowest confidence threshold whose kept cases reach ``target_accuracy``; probs (N, K), targets (N,).

    Candidates are the observed top-class confidences: a threshold ``t`` keeps every case with confidence
    ``>= t``. Lowest threshold = most cases kept. A threshold of 0.0 means the target is met with no
    abstention at all. The target counts as reached only if the kept share is at least ``min_coverage``
    (a model that answers 1 case in 20 is not useful). Otherwise (fallback) the threshold maximises accuracy
    on the kept cases among those keeping at least ``min_coverage`` (ties: the lower threshold), and
    ``target_reached`` is False.
    """
    if not 0.0 < target_accuracy <= 1.0:
        raise MpoxscopeError(f"target_accuracy: must be in (0, 1], got {target_accuracy}")
    if not 0.0 <= min_coverage <= 1.0:
        raise MpoxscopeError(f"min_coverage: must be in [0, 1], got {min_coverage}")
    p, y = _check(probs, targets, "probabilities")
    n = len(y)
    conf = p.max(axis=1)
    order = np.argsort(-conf, kind="stable")
    conf_sorted = conf[order]
    correct = (p.argmax(axis=1) == y)[order]
    # Keeping the k most confident cases; only k at the end of a run of tied confidences is a real threshold.
    kept = np.arange(1, n + 1)
    acc = np.cumsum(correct) / kept
    valid = np.r_[conf_sorted[1:] < conf_sorted[:-1], True]
    coverage = kept / n
    # Tiny tolerance: an accuracy of exactly 19/20 must count as reaching 0.95.
    eps = 1e-12
    ok = valid & (acc >= target_accuracy - eps) & (coverage >= min_coverage - eps)
    if ok.any():
        i, reached = int(np.flatnonzero(ok)[-1]), True
    else:
        enough = valid & (coverage >= min_coverage - eps)
        if not enough.any():  # only when min_coverage > 1 share is impossible; keep everything
            enough = valid
        cand = np.flatnonzero(enough)
        # Highest accuracy; among equal accuracies the largest coverage (= lowest threshold).
        i, reached = int(cand[np.lexsort((-cand, -acc[cand]))[0]]), False
    threshold = 0.0 if i == n - 1 else float(conf_sorted[i])
    return AbstainChoice(threshold=threshold, accuracy_kept=float(acc[i]), coverage=float(coverage[i]),
                         n_kept=int(kept[i]), target_accuracy=float(target_accuracy),
                         min_coverage=float(min_coverage), target_reached=reached)


def selective_metrics(probs: Any, targets: Any, threshold: float) -> dict[str, Any]:
    """Coverage and accuracy when cases with top probability ``< threshold`` are withheld.

    probs (N, K), targets (N,). Returns JSON-ready ``{"threshold", "n", "n_kept", "coverage", "accuracy_kept",
    "accuracy_all", "accuracy_abstained"}``; an accuracy over no cases is ``None``.
    """
    p, y = _check(probs, targets, "probabilities")
    conf, correct = p.max(axis=1), p.argmax(axis=1) == y
    keep = conf >= threshold
    n_kept = int(keep.sum())

    def mean(mask: np.ndarray) -> float | None:
        return float(correct[mask].mean()) if mask.any() else None

    return {"threshold": float(threshold), "n": len(y), "n_kept": n_kept, "coverage": n_kept / len(y),
            "accuracy_kept": mean(keep), "accuracy_all": float(correct.mean()),
            "accuracy_abstained": mean(~keep)}


def calibrate(val_logits: Any, val_targets: Any, target_accuracy: float = 0.95, min_coverage: float = 0.5,
              n_bins: int = 15) -> dict[str, Any]:
    """Fit temperature and abstain threshold on validation logits (N, K) and targets (N,).

    Returns the ``"calibration"`` block of ``model.json``. Before/after numbers are measured on the same
    validation data the temperature was fitted on (``"fitted_on": "validation"``), so they show the fit, not
    generalisation; report test-set ECE from the evaluation. The threshold is chosen on the calibrated
    probabilities, which are what :class:`~mpoxscope.engine.predict.Predictor` outputs.
    """
    x, y = _check(val_logits, val_targets, "validation logits")
    t = fit_temperature(x, y)
    before, after = apply_temperature(x, 1.0), apply_temperature(x, t)
    choice = choose_abstain_threshold(after, y, target_accuracy, min_coverage)
    return {
        "method": "temperature",
        "temperature": t,
        "ece_before": expected_calibration_error(before, y, n_bins),
        "ece_after": expected_calibration_error(after, y, n_bins),
        "nll_before": nll(x, y, 1.0),
        "nll_after": nll(x, y, t),
        "ece_bins": n_bins,
        "accuracy": float((x.argmax(axis=1) == y).mean()),
        "abstain_threshold": choice.threshold,
        "abstain_target_accuracy": choice.target_accuracy,
        "abstain_min_coverage": choice.min_coverage,
        "abstain_target_reached": choice.target_reached,
        "abstain_accuracy_kept": choice.accuracy_kept,
        "abstain_coverage": choice.coverage,
        "fitted_on": "validation",
        "n": len(y),
    }
