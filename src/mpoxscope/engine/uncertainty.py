"""Uncertainty of headline numbers: bootstrap confidence intervals, reliability diagrams, risk–coverage.

* :func:`bootstrap_ci`: percentile bootstrap of any statistic, resampling items or, with ``groups``, whole
  groups (patients). Images of one patient are correlated, so resampling patients is the honest choice when
  patients are known (a cluster bootstrap; Field & Welsh, 2007).
* :func:`classification_cis`: 95 % intervals for accuracy, macro-F1 and per-class recall in one pass.
* :func:`risk_coverage`: the selective-prediction curve (Geifman & El-Yaniv, 2017) and its area (AURC).
* :func:`reliability_png` / :func:`risk_coverage_png`: the two plots reviewers expect beside the numbers.

Expected calibration error (15 equal-width bins) lives in :mod:`mpoxscope.engine.calibration`.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from mpoxscope.errors import MpoxscopeError

N_BOOT = 2000
LEVEL = 0.95


def _units(n: int, groups: Sequence | None) -> np.ndarray:
    """The resampling unit of each of the ``n`` items (N,): the item itself, or its group (0..G-1, in sorted
    group order)."""
    if groups is None:
        return np.arange(n)
    g = np.asarray(groups)
    if len(g) != n:
        raise MpoxscopeError(f"bootstrap: {len(g)} group labels for {n} items")
    return np.unique(g, return_inverse=True)[1].reshape(-1)


def _draw_units(rng: np.random.Generator, n_units: int) -> np.ndarray:
    """One resample: ``n_units`` unit indices drawn with replacement (the one place draws happen, so the
    loop of :func:`bootstrap_ci` and the counting path of :func:`classification_cis` resample alike)."""
    return rng.integers(0, n_units, n_units)


def _resample_plan(n: int, groups: Sequence | None) -> Callable[[np.random.Generator], np.ndarray]:
    """A function drawing one bootstrap resample (indices into the ``n`` items)."""
    unit = _units(n, groups)
    if groups is None:
        return lambda rng: _draw_units(rng, n)
    order = np.argsort(unit, kind="stable")
    members = np.split(order, np.cumsum(np.bincount(unit))[:-1])

    def draw(rng: np.random.Generator) -> np.ndarray:
        return np.concatenate([members[j] for j in _draw_units(rng, len(members))])

    return draw


def bootstrap_ci(fn: Callable[..., Any], *arrays: Any, groups: Sequence | None = None, n: int = N_BOOT,
                 seed: int = 0, alpha: float = 1 - LEVEL) -> dict[str, Any]:
    """Percentile bootstrap interval of ``fn(*arrays)``.

    ``arrays`` are equally long along axis 0 (e.g. targets (N,), predictions (N,)); each resample draws N
    items with replacement, or, with ``groups`` (N,), as many groups as there are with replacement and keeps
    all their items. ``fn`` returns a number or a 1-D array (several statistics at once); a NaN in a resample
    (a statistic undefined there, e.g. the recall of a class it lacks) is left out of that statistic's
    percentiles. Returns ``{"value", "low", "high", "level", "n_boot", "resampled"}`` (arrays when ``fn``
    returns arrays).
    """
    arrs = _checked(arrays, alpha)
    size = len(arrs[0])
    draw = _resample_plan(size, groups)
    rng = np.random.default_rng(seed)
    value = np.asarray(fn(*arrs), dtype=float)
    stats = np.empty((n, *value.shape))
    for b in range(n):
        idx = draw(rng)
        stats[b] = fn(*(a[idx] for a in arrs))
    return _percentile_interval(value, stats, alpha, size, groups)


def _checked(arrays: Sequence, alpha: float) -> list[np.ndarray]:
    """The arrays as numpy arrays, refused in one line when empty, unequally long or ``alpha`` is outside (0, 1)."""
    arrs = [np.asarray(a) for a in arrays]
    if not arrs or len(arrs[0]) == 0:
        raise MpoxscopeError("bootstrap: no data")
    if any(len(a) != len(arrs[0]) for a in arrs):
        raise MpoxscopeError("bootstrap: arrays differ in length")
    if not 0 < alpha < 1:
        raise MpoxscopeError(f"bootstrap: alpha must be in (0, 1), got {alpha}")
    return arrs


def _percentile_interval(value: np.ndarray, stats: np.ndarray, alpha: float, size: int,
                         groups: Sequence | None) -> dict[str, Any]:
    """:func:`bootstrap_ci`'s answer from the statistic ``value`` and its resampled values ``stats`` (B, ...)."""
    with warnings.catch_warnings():  # an all-NaN column (a class absent from every resample) stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        low = np.nanpercentile(stats, 100 * alpha / 2, axis=0)
        high = np.nanpercentile(stats, 100 * (1 - alpha / 2), axis=0)
    n_groups = len(set(np.asarray(groups).tolist())) if groups is not None else size
    out = {"value": value, "low": low, "high": high}
    out = {k: (float(v) if v.ndim == 0 else v) for k, v in out.items()}
    return {**out, "level": 1 - alpha, "n_boot": len(stats),
            "resampled": f"{n_groups} patients" if groups is not None else f"{size} images"}


def _scores(cm: np.ndarray) -> np.ndarray:
    """Confusion matrices (B, K, K) (rows true, columns predicted) -> (B, 3 + 2K): [accuracy, macro-F1 (classes
    present), weighted F1, recall of class 0..K-1, F1 of class 0..K-1]; a class absent from a matrix's rows has
    recall and F1 NaN there (undefined, not 0)."""
    cm = np.asarray(cm, dtype=float)
    tp, support, predicted = np.diagonal(cm, axis1=1, axis2=2), cm.sum(2), cm.sum(1)
    total = support.sum(1)
    present = support > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(present, tp / support, np.nan)
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        f1 = np.where(tp > 0, 2 * precision * recall / (precision + recall), 0.0)
    f1 = np.where(present, f1, np.nan)
    f1_present = np.where(present, f1, 0.0)
    return np.column_stack([tp.sum(1) / total, f1_present.sum(1) / present.sum(1),
                            (f1_present * support).sum(1) / total, recall, f1])


def _resampled_confusions(cells: np.ndarray, k: int, groups: Sequence | None, n: int, seed: int) -> np.ndarray:
    """The confusion matrix (n, K, K) of each of ``n`` bootstrap resamples of the items whose cells
    (true * K + predicted, (N,)) are given: the very resamples :func:`bootstrap_ci` draws with this seed,
    counted instead of indexed (a resample's matrix = its unit counts times the per-unit matrices), so 2000
    resamples take milliseconds, in memory bounded by the chunk."""
    unit = _units(len(cells), groups)
    n_units = int(unit.max()) + 1
    # float64 so the product runs on BLAS; integer counts stay exact (far below 2**53)
    table = np.zeros((n_units, k * k))
    np.add.at(table, (unit, cells), 1.0)
    rng = np.random.default_rng(seed)
    out = np.empty((n, k * k))
    chunk = max(1, 2**22 // n_units)  # ~32 MB of counts at a time
    for start in range(0, n, chunk):
        counts = np.stack([np.bincount(_draw_units(rng, n_units), minlength=n_units).astype(float)
                           for _ in range(start, min(n, start + chunk))])
        out[start:start + len(counts)] = counts @ table
    return out.reshape(n, k, k)


def classification_cis(targets: Any, preds: Any, classes: list[str], groups: Sequence | None = None,
                       n: int = N_BOOT, seed: int = 0, alpha: float = 1 - LEVEL) -> dict[str, Any]:
    """95 % percentile-bootstrap intervals of accuracy, macro- and weighted F1, per-class recall and F1.

    targets, preds (N,) class indices; ``groups`` (N,) patients to resample whole patients (ignored when every
    image is its own group). Macro-F1 averages the classes present in each resample, as
    :func:`~mpoxscope.engine.metrics.classification_metrics` does. JSON-ready: ``{"accuracy": {value, low,
    high, level}, "f1_macro": ..., "f1_weighted": ..., "recall": {class: ...}, "f1": {class: ...},
    "method": ...}``.
    """
    y, p = (a.astype(int) for a in _checked([targets, preds], alpha))
    k = len(classes)
    if groups is not None and len(set(np.asarray(groups).tolist())) == len(y):
        groups = None  # one image per group: the plain image bootstrap, and say so
    cells = y * k + p
    value = _scores(np.bincount(cells, minlength=k * k).reshape(1, k, k))[0]
    res = _percentile_interval(value, _scores(_resampled_confusions(cells, k, groups, n, seed)), alpha, len(y),
                               groups)

    def interval(i: int) -> dict[str, Any]:
        val, lo, hi = (float(res[key][i]) for key in ("value", "low", "high"))
        if np.isnan(val):
            return {"value": None, "low": None, "high": None, "level": res["level"]}
        return {"value": val, "low": lo, "high": hi, "level": res["level"]}

    return {
        "accuracy": interval(0), "f1_macro": interval(1), "f1_weighted": interval(2),
        "recall": {c: interval(3 + j) for j, c in enumerate(classes)},
        "f1": {c: interval(3 + k + j) for j, c in enumerate(classes)},
        "method": f"percentile bootstrap, {n} resamples of {res['resampled']}, seed {seed}",
        "level": res["level"],
    }


def fmt_ci(ci: dict | None, pct: bool = True, digits: int | None = None) -> str:
    """``"72.4 [66.1, 78.3]"`` (percent) or ``"0.724 [0.661, 0.783]"``; "n/a" when missing."""
    if not ci or ci.get("value") is None:
        return "n/a"
    scale, d = (100, 1 if digits is None else digits) if pct else (1, 3 if digits is None else digits)
    return f"{scale * ci['value']:.{d}f} [{scale * ci['low']:.{d}f}, {scale * ci['high']:.{d}f}]"


def ece_words(e: float, check: dict[str, Any] | None) -> str:
    """ECE ``e`` beside ``calibration.ece_consistency``'s perfectly calibrated model (``check``), as one phrase."""
    if not check:
        return f"{e:.3f}"
    return (f"{e:.3f} (a perfectly calibrated model with these confidences: {check['perfect_mean']:.3f} on average, "
            f"95th percentile {check['perfect_p95']:.3f}; P(ECE ≥ observed) = {check['p_value']:.2f})")


# ------------------------------------------------------------------------------------ selective prediction
def risk_coverage(confidence: Any, correct: Any) -> dict[str, Any]:
    """Risk (error rate of the kept cases) against coverage (share kept) when keeping the most confident.

    confidence (N,), correct (N,) bool. Only thresholds at the end of a run of tied confidences are real, so a
    tied block shares the risk measured at its end. ``aurc`` is the mean risk over the N coverage levels
    (area under the curve); ``aurc_optimal`` is the area an oracle ranking (all errors last) would reach with
    the same errors, and ``eaurc`` their difference (excess AURC; Geifman et al., 2019).
    """
    conf = np.asarray(confidence, dtype=float)
    ok = np.asarray(correct, dtype=bool)
    if conf.ndim != 1 or len(conf) != len(ok) or len(conf) == 0:
        raise MpoxscopeError("risk_coverage: need equally long, non-empty confidence and correct arrays")
    n = len(conf)
    order = np.argsort(-conf, kind="stable")
    c_sorted, errors = conf[order], np.cumsum(~ok[order])
    kept = np.arange(1, n + 1)
    ends = np.r_[np.flatnonzero(c_sorted[1:] < c_sorted[:-1]), n - 1]
    risk_at_end = errors[ends] / kept[ends]
    block = np.searchsorted(ends, np.arange(n))  # which tied block each position belongs to
    aurc = float(risk_at_end[block].mean())
    n_err = int((~ok).sum())
    oracle = np.maximum(0, kept - (n - n_err)) / kept  # errors only once every correct case is kept
    return {"coverage": (kept[ends] / n).tolist(), "risk": risk_at_end.tolist(), "threshold": c_sorted[ends].tolist(),
            "aurc": aurc, "aurc_optimal": float(oracle.mean()), "eaurc": aurc - float(oracle.mean()), "n": n}


# ------------------------------------------------------------------------------------------------- plots
def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _draw_reliability(ax, axc, probs: Any, targets: Any, title: str, n_bins: int) -> None:
    from mpoxscope.engine.calibration import expected_calibration_error, reliability_bins

    bins = reliability_bins(probs, targets, n_bins)
    ece = expected_calibration_error(probs, targets, n_bins)
    width = bins.edges[1] - bins.edges[0]
    centres = bins.edges[:-1] + width / 2
    used = bins.count > 0
    ax.bar(centres[used], bins.accuracy[used], width * 0.95, color="C0", edgecolor="k", lw=0.4, label="accuracy")
    ax.bar(centres[used], bins.confidence[used] - bins.accuracy[used], width * 0.95, bottom=bins.accuracy[used],
           color="C3", alpha=0.35, label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy in bin")
    ax.set_title(f"{title}\nECE ({n_bins} bins) = {ece:.3f}, n = {int(bins.count.sum())}", fontsize=8)
    axc.bar(centres, bins.count, width * 0.95, color="0.5")
    axc.set_xlabel("confidence (top-class probability)", fontsize=8)
    axc.set_ylabel("images", fontsize=8)


def reliability_png(probs: Any, targets: Any, title: str, n_bins: int = 15) -> bytes:
    """Reliability diagram of probs (N, K) against targets (N,): accuracy per confidence bin beside the
    diagonal (perfect calibration), bin counts underneath, ECE in the title."""
    plt = _plt()
    fig, (ax, axc) = plt.subplots(2, 1, figsize=(4.6, 5.2), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    _draw_reliability(ax, axc, probs, targets, title, n_bins)
    ax.legend(loc="upper left", fontsize=7)
    return _png(fig)


def reliability_grid_png(panels: dict[str, tuple[Any, Any]], title: str, n_bins: int = 15) -> bytes:
    """One reliability diagram per entry (label -> (probs (N, K), targets (N,))), side by side."""
    plt = _plt()
    n = len(panels)
    fig, axes = plt.subplots(2, n, figsize=(3.0 * n, 4.4), gridspec_kw={"height_ratios": [3, 1]}, sharex=True,
                             squeeze=False)
    for j, (label, (probs, targets)) in enumerate(panels.items()):
        _draw_reliability(axes[0, j], axes[1, j], probs, targets, label, n_bins)
    axes[0, 0].legend(loc="upper left", fontsize=6)
    fig.suptitle(title, fontsize=8)
    return _png(fig)


def risk_coverage_png(curves: dict[str, dict], title: str, marks: dict[str, tuple[float, float]] | None = None
                      ) -> bytes:
    """Risk–coverage curves (label -> :func:`risk_coverage` result), AURC in the legend; ``marks`` puts a
    point at (coverage, risk) per label, e.g. where the abstain threshold lands."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.0, 3.8))
    for i, (label, rc) in enumerate(curves.items()):
        ax.step(rc["coverage"], rc["risk"], where="post", color=f"C{i}", lw=1.2,
                label=f"{label} (AURC {rc['aurc']:.3f})")
        if marks and label in marks and marks[label][0] is not None:
            ax.plot(*marks[label], "o", color=f"C{i}", ms=5)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, max(0.05, max(max(rc["risk"]) for rc in curves.values()) * 1.1))
    ax.set_xlabel("coverage (share of images answered, most confident first)")
    ax.set_ylabel("risk (error rate on answered)")
    ax.set_title(title + ("\n(dot: abstain threshold from validation)" if marks else ""), fontsize=8)
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    return _png(fig)
