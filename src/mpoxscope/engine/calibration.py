"""Calibration on validation logits: temperature scaling, calibration error, a selective-prediction threshold.

Everything here is a pure function of arrays: ``logits`` (N, K) raw model outputs, ``probs`` (N, K) class
probabilities (rows sum to 1), ``targets`` (N,) integer class indices. Torch tensors are accepted too.

* :func:`fit_temperature` (Guo et al., 2017, "On Calibration of Modern Neural Networks"): one scalar
  ``T`` such that ``softmax(logits / T)`` minimises the negative log-likelihood. It never changes the
  predicted class.
* :func:`expected_calibration_error`: the gap between confidence and accuracy, averaged over confidence bins.
* :func:`choose_abstain_threshold`: the confidence below which the model should say "not sure, see a
  clinician", chosen so that the cases it keeps reach a target accuracy.
* :func:`fit_vector_scaling`: per-class scale and bias (Guo et al., 2017), for a class-dependent bias.
* :func:`calibrate`: chooses none / temperature (/ vector) on held-out parts of the validation set, applying a
  step only when it lowers held-out NLL without raising held-out ECE (an ensemble, ``ENSEMBLE_METHODS``: always
  a temperature); returns the ``"calibration"`` block of a run's ``model.json``. :func:`apply_calibration`
  applies such a block to logits (torch or NumPy).
* :func:`fit_pooled_calibration`: one calibration on the validation logits of all folds pooled (a fold's own
  test images excluded), for cross-validation, where one fold's ~150 validation images are too few.
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


def _bin_index(conf: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Equal-width bin edges and each confidence's bin: bin i holds (edges[i], edges[i+1]]; a confidence of
    exactly 0 (impossible for K >= 2) would go to bin 0."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return edges, np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)


def reliability_bins(probs: Any, targets: Any, n_bins: int = 15) -> ReliabilityBins:
    """Bin the top-class confidence of ``probs`` (N, K) into ``n_bins`` equal-width bins (lo, hi]."""
    p, y = _check(probs, targets, "probabilities")
    conf, correct = p.max(axis=1), (p.argmax(axis=1) == y).astype(np.float64)
    edges, idx = _bin_index(conf, n_bins)
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


def ece_consistency(probs: Any, targets: Any, n_bins: int = 15, draws: int = 2000, seed: int = 0,
                    ) -> dict[str, Any]:
    """How large an ECE sampling alone gives a perfectly calibrated model with these confidences.

    probs (N, K), targets (N,). ECE is biased upwards on small sets: a model right exactly as often as it says
    shows a positive ECE on N predictions. Consistency resampling (Bröcker & Smith, 2007): each prediction is
    drawn right with probability equal to its top-class confidence (``draws`` times, same bins), and the observed
    ECE is compared with the draws' ECEs. Returns ``{"ece", "perfect_mean", "perfect_p95", "p_value", "draws",
    "n_bins"}``; ``p_value`` is the share of draws with an ECE at least the observed one (small: miscalibrated
    beyond what sampling explains). No bootstrap interval beside it: resampling inherits ECE's upward bias (a
    resample repeats patients and thins the bins), and on the official folds the percentile interval excluded its
    own point value (0.034 [0.035, 0.088], ``benchmarks/results/calibration.md``).

    >>> p = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    >>> r = ece_consistency(p, np.array([0, 1, 1, 0]), n_bins=5, draws=500)
    >>> 0.0 < r["perfect_mean"] < r["perfect_p95"] and 0.0 <= r["p_value"] <= 1.0
    True
    """
    p, y = _check(probs, targets, "probabilities")
    conf, correct = p.max(axis=1), (p.argmax(axis=1) == y).astype(np.float64)
    _, idx = _bin_index(conf, n_bins)
    onehot = np.eye(n_bins)[idx]  # (N, B)
    conf_sum = conf @ onehot  # (B,)

    def ece(hits: np.ndarray) -> np.ndarray:  # (D, N) 0/1 -> (D,) ECE, the same sum as expected_calibration_error
        return np.abs(hits @ onehot - conf_sum).sum(axis=-1) / len(conf)

    observed = float(ece(correct[None])[0])
    sims = ece((np.random.default_rng(seed).random((draws, len(conf))) < conf).astype(np.float64))
    return {"ece": observed, "perfect_mean": float(sims.mean()), "perfect_p95": float(np.percentile(sims, 95)),
            "p_value": float(np.mean(sims >= observed - 1e-12)), "draws": draws, "n_bins": n_bins}


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


# ------------------------------------------------------------------------------------- vector scaling
def fit_vector_scaling(logits: Any, targets: Any, l2: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Per-class scale ``w`` (K,) and bias ``b`` (K,) minimising the NLL of ``softmax(logits * w + b)``.

    Vector scaling (Guo et al., 2017): 2K parameters, so it can also fix a per-class bias, and it can change
    the predicted class. A small L2 pull towards the identity (w = 1, b = 0) keeps it finite on a separable
    validation set. logits (N, K), targets (N,).
    """
    from scipy.optimize import minimize

    x, y = _check(logits, targets, "logits")
    n, k = x.shape
    onehot = np.eye(k)[y]

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[:k], theta[k:]
        z = x * w + b
        logp = log_softmax(z, axis=1)
        g = (np.exp(logp) - onehot) / n  # dNLL/dz
        loss = -logp[np.arange(n), y].mean() + l2 * (np.sum((w - 1) ** 2) + np.sum(b ** 2))
        grad = np.r_[(g * x).sum(0) + 2 * l2 * (w - 1), g.sum(0) + 2 * l2 * b]
        return float(loss), grad

    t = fit_temperature(x, y)  # start from the temperature solution: vector scaling can only improve on it
    res = minimize(objective, np.r_[np.full(k, 1.0 / t), np.zeros(k)], jac=True, method="L-BFGS-B",
                   options={"maxiter": 500})
    return res.x[:k].astype(float), res.x[k:].astype(float)


def _calibrated_logits(x: np.ndarray, cal: dict[str, Any]) -> np.ndarray:
    method = cal.get("method", "temperature")
    if method == "vector":
        return x * np.asarray(cal["vector_w"], dtype=np.float64) + np.asarray(cal["vector_b"], dtype=np.float64)
    return x / float(cal.get("temperature", 1.0))


def apply_calibration(logits: Any, calibration: dict[str, Any] | None) -> Any:
    """Calibrated logits for ``logits`` (N, K): softmax of the result gives the calibrated probabilities.

    ``calibration`` is a run's ``model.json`` "calibration" block: method "none" / "temperature" divides by
    ``temperature`` (1 for "none"); "vector" computes ``logits * vector_w + vector_b``. A torch tensor comes
    back as a tensor (same device and dtype), anything else as a NumPy array. This is the one function the
    PyTorch and ONNX predictors should call, so every runtime applies the same calibration.
    """
    cal = calibration or {}
    method = cal.get("method", "temperature")
    if method not in ("none", "temperature", "vector"):
        raise MpoxscopeError(f"model.json: unknown calibration method {method!r}")
    if hasattr(logits, "detach"):  # torch: stay on the tensor's device and dtype (also exportable)
        import torch

        if method == "vector":
            w = torch.as_tensor(cal["vector_w"], dtype=logits.dtype, device=logits.device)
            b = torch.as_tensor(cal["vector_b"], dtype=logits.dtype, device=logits.device)
            return logits * w + b
        return logits / float(cal.get("temperature", 1.0))
    return _calibrated_logits(_as_numpy(logits), cal)


# ------------------------------------------------------------------------------ choosing the calibration
#: What :func:`calibrate` may choose. "vector" is chosen only when asked for (``methods=ALL_METHODS``), because
#: a predictor must call :func:`apply_calibration` to honour it (a temperature-only predictor would not).
DEFAULT_METHODS = ("none", "temperature")
ALL_METHODS = ("none", "temperature", "vector")
#: An ensemble's own step: always a temperature, with no held-out gate against "none". Chosen on validation only
#: (benchmarks/calibration_posthoc.py, results/calibration.md): on the default ensemble's pooled out-of-fold
#: validation predictions it had a lower ECE and NLL than the gated choice, whose ECE check on ~30 held-out images
#: is noise that sometimes keeps a useful temperature out. Still never worse in-sample: fit_temperature returns 1
#: when no temperature lowers the NLL.
ENSEMBLE_METHODS = ("temperature",)


def _fit(method: str, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    if method == "none":
        return {"method": "none", "temperature": 1.0}
    if method == "temperature":
        return {"method": "temperature", "temperature": fit_temperature(x, y)}
    if method == "vector":
        w, b = fit_vector_scaling(x, y)
        return {"method": "vector", "temperature": 1.0, "vector_w": w.tolist(), "vector_b": b.tolist()}
    raise MpoxscopeError(f"unknown calibration method {method!r}; choose from {', '.join(ALL_METHODS)}")


def cross_validated_scores(x: np.ndarray, y: np.ndarray, methods: tuple[str, ...], n_splits: int = 5,
                           seed: int = 0, n_bins: int = 15) -> dict[str, dict[str, float]]:
    """Out-of-fold NLL and ECE of each calibration method on the validation logits x (N, K), y (N,).

    Each method is fitted on 4/5 of the validation images and scored on the remaining 1/5; the out-of-fold
    probabilities of all images are pooled. Scoring a method on the images it was fitted on would always
    favour the one with more parameters.
    """
    from sklearn.model_selection import KFold, StratifiedKFold

    counts = np.bincount(y, minlength=x.shape[1])
    stratify = counts[counts > 0].min() >= n_splits
    splitter = (StratifiedKFold if stratify else KFold)(n_splits=n_splits, shuffle=True, random_state=seed)
    out = {}
    for method in methods:
        oof = np.zeros_like(x)
        for tr, te in splitter.split(x, y):
            oof[te] = softmax(_calibrated_logits(x[te], _fit(method, x[tr], y[tr])), axis=1)
        out[method] = {"nll": float(-np.log(np.clip(oof[np.arange(len(y)), y], 1e-12, None)).mean()),
                       "ece": expected_calibration_error(oof, y, n_bins)}
    return out


def choose_calibration(x: np.ndarray, y: np.ndarray, methods: tuple[str, ...] = DEFAULT_METHODS,
                       n_bins: int = 15) -> tuple[str, dict[str, dict[str, float]], str]:
    """(chosen method, scores per method, how they were scored), from validation logits only.

    The allowed ``methods`` are tried from the simplest up; a more complex one replaces the current choice only
    when it lowers the held-out NLL *and* does not raise the held-out ECE, so a step that worsens calibration on
    validation is never applied. Without "none" in ``methods`` the simplest allowed method is the starting point
    and is applied ungated ("none" is still scored, for the record). With fewer than 25 validation images there is
    too little to hold out: "vector" is dropped and the rest are compared on the fitting data itself.
    """
    allowed = tuple(m for m in ALL_METHODS if m in set(methods))
    unknown = set(methods) - set(ALL_METHODS)
    if unknown or not allowed:
        raise MpoxscopeError(f"unknown calibration method {sorted(unknown) or methods!r}; choose from "
                             f"{', '.join(ALL_METHODS)}")
    if len(y) < 25:
        allowed = tuple(m for m in allowed if m != "vector") or ("temperature",)
    methods = tuple(m for m in ALL_METHODS if m in set(allowed) | {"none"})
    if len(y) < 25:
        scores, how = {}, "in-sample on validation (fewer than 25 images)"
        for m in methods:
            probs = softmax(_calibrated_logits(x, _fit(m, x, y)), axis=1)
            scores[m] = {"nll": float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None)).mean()),
                         "ece": expected_calibration_error(probs, y, n_bins)}
    else:
        scores, how = cross_validated_scores(x, y, methods, n_bins=n_bins), "5-fold cross-validation on validation"
    chosen = allowed[0]
    for m in allowed[1:]:
        if scores[m]["nll"] < scores[chosen]["nll"] - 1e-9 and scores[m]["ece"] <= scores[chosen]["ece"] + 1e-9:
            chosen = m
    rule = ("lowest held-out NLL without a higher held-out ECE, simplest first" if len(allowed) > 1 else
            f"{allowed[0]} always (the only method allowed)")
    if "none" not in allowed and len(allowed) > 1:
        rule += f", starting from {allowed[0]} (no gate against none)"
    return chosen, scores, f"{how}: {rule}"


def calibrate(val_logits: Any, val_targets: Any, target_accuracy: float = 0.95, min_coverage: float = 0.5,
              n_bins: int = 15, methods: tuple[str, ...] = DEFAULT_METHODS,
              fitted_on: str = "validation") -> dict[str, Any]:
    """Choose and fit a calibration and an abstain threshold on validation logits (N, K) and targets (N,).

    Returns the ``"calibration"`` block of ``model.json``. The method ("none", "temperature" or, if allowed in
    ``methods``, "vector") is chosen by :func:`choose_calibration` on held-out parts of the validation set,
    then refitted on all of it; ``methods=ENSEMBLE_METHODS`` always fits a temperature (what an ensemble uses).
    ``temperature`` is always present (1.0 unless the method is "temperature"), so a predictor that only knows
    temperatures stays correct for "none" and "temperature"; "vector" adds ``vector_w``/``vector_b`` and needs
    :func:`apply_calibration`. Before/after numbers are measured on the data the calibration was fitted on, so
    they show the fit, not generalisation; report test ECE from the evaluation. The threshold is chosen on the
    calibrated probabilities, which are what the predictor outputs.
    """
    x, y = _check(val_logits, val_targets, "validation logits")
    chosen, scores, how = choose_calibration(x, y, methods, n_bins)
    fit = _fit(chosen, x, y)
    before, after = softmax(x, axis=1), softmax(_calibrated_logits(x, fit), axis=1)
    choice = choose_abstain_threshold(after, y, target_accuracy, min_coverage)
    rows = np.arange(len(y))
    return {
        **fit,
        "ece_before": expected_calibration_error(before, y, n_bins),
        "ece_after": expected_calibration_error(after, y, n_bins),
        "nll_before": nll(x, y, 1.0),
        "nll_after": float(-np.log(np.clip(after[rows, y], 1e-300, None)).mean()),
        "ece_bins": n_bins,
        "accuracy": float((x.argmax(axis=1) == y).mean()),
        "accuracy_after": float((after.argmax(axis=1) == y).mean()),
        "abstain_threshold": choice.threshold,
        "abstain_target_accuracy": choice.target_accuracy,
        "abstain_min_coverage": choice.min_coverage,
        "abstain_target_reached": choice.target_reached,
        "abstain_accuracy_kept": choice.accuracy_kept,
        "abstain_coverage": choice.coverage,
        "candidates": scores,
        "selected_by": how,
        "fitted_on": fitted_on,
        "n": len(y),
    }


# ------------------------------------------------------------------ cross-validation: pooled validation
def logits_from_probs(probs: Any, calibration: dict[str, Any] | None = None) -> np.ndarray:
    """Logits equivalent to a run's raw logits, recovered from its saved probabilities (N, K).

    ``log p`` equals the calibrated logits up to a per-row constant, which softmax ignores; multiplying by the
    run's temperature undoes temperature scaling, so refitting a temperature on the result is exact (up to
    the rounding of the saved probabilities). Vector-scaled probabilities cannot be inverted this way.
    """
    cal = calibration or {}
    if cal.get("method") == "vector":
        raise MpoxscopeError("cannot recover raw logits from vector-scaled probabilities; save the logits")
    p = _as_numpy(probs)
    return np.log(np.clip(p, 1e-6, None)) * float(cal.get("temperature", 1.0))


def fit_pooled_calibration(parts: list[tuple[Any, Any, list[str]]], exclude: set[str] | frozenset[str] = frozenset(),
                           methods: tuple[str, ...] = DEFAULT_METHODS, **kwargs: Any) -> dict[str, Any]:
    """One calibration fitted on the validation logits of several folds pooled, for cross-validation.

    ``parts``: per fold ``(logits (N, K), targets (N,), filenames)`` of its validation images (its own
    model's raw logits, e.g. from :func:`logits_from_probs`). Images named in ``exclude`` (the test images of
    the fold being calibrated) are left out, so no test image of that fold informs its calibration. A single
    fold's validation part (~150 images on MSLD v2.0) gives a noisy temperature; pooling five gives ~750.
    Returns a :func:`calibrate` block with ``fitted_on`` saying what was pooled.
    """
    xs, ys, used_parts = [], [], 0
    for logits, targets, names in parts:
        x, y = _check(logits, targets, "validation logits")
        if len(names) != len(y):
            raise MpoxscopeError(f"pooled calibration: {len(names)} file names for {len(y)} logits")
        keep = np.array([n not in exclude for n in names], dtype=bool)
        if keep.any():
            xs.append(x[keep])
            ys.append(y[keep])
            used_parts += 1
    if not xs:
        raise MpoxscopeError("pooled calibration: no validation images left after excluding the test images")
    x, y = np.concatenate(xs), np.concatenate(ys)
    return calibrate(x, y, methods=methods, fitted_on=f"pooled validation of {used_parts} folds "
                     f"({len(y)} predictions; this fold's test images excluded)", **kwargs)
