"""Which calibration should an ensemble run apply? Post hoc, from a finished cross-validation's saved predictions.

Every candidate is something a run can apply by itself at inference (a function of the members' logits fixed at
training time), so train, cv, predict, serve and ONNX would give the same probabilities. The members' raw logits are
recovered from their saved calibrated probabilities (``log p * T``, exact up to a per-row constant and the 6-decimal
rounding); the script checks that combining them reproduces the ensemble's saved probabilities.

Choice, on validation only: inside each fold's validation part the whole calibration pipeline (member temperatures
where the method uses them, then the ensemble-level calibrator) is fitted on 4/5 of the patients and applied to the
other 1/5 (stratified group 5-fold, ``--repeats`` random patient partitions); the out-of-fold validation
probabilities of all folds are pooled, as the test predictions are, and scored by ECE (15 equal-width bins) and NLL.
Rule, fixed before any test number is computed: the lowest mean pooled out-of-fold validation ECE wins; a method
within ``--tie`` of the best that has fewer parameters wins instead; it must not have a higher out-of-fold NLL than
today's method. Only then is every method fitted on each fold's full validation part and scored on its test part;
the test column is reported for all methods but never read by the choice (``--validation-only`` stops before it).

    python benchmarks/calibration_posthoc.py /work/runs/cv_ensemble /work/runs/cv_default \
        /work/runs/cv_lite2_frozen224 --out benchmarks/results/calibration.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import minimize, minimize_scalar
from scipy.special import log_softmax, logsumexp, softmax

from mpoxscope.data.samples import patient_group
from mpoxscope.engine.calibration import (
    ENSEMBLE_METHODS,
    T_MAX,
    T_MIN,
    calibrate,
    expected_calibration_error,
    fit_temperature,
    fit_vector_scaling,
)
from mpoxscope.engine.screening import read_predictions_csv

N_BINS = 15
Members = list[np.ndarray]  # one (N, K) raw-logit array per member
Apply = Callable[[Members], np.ndarray]  # member logits -> (N, K) calibrated probabilities


# ----------------------------------------------------------------------------------------------- data
@dataclass
class Split:
    names: list[str]
    y: np.ndarray
    members: Members  # raw logits, one (N, K) per member
    saved: np.ndarray  # the ensemble's saved calibrated probabilities (today's output)
    t_ens: float  # the ensemble temperature those were saved with

    @property
    def groups(self) -> np.ndarray:
        return np.array([patient_group(n) or n for n in self.names])


def _probs(path: Path, order: list[str] | None = None) -> tuple[list[str], np.ndarray, np.ndarray]:
    pred, _ = read_predictions_csv(path)
    p = pred.probs / pred.probs.sum(1, keepdims=True)
    if order is None:
        return pred.names, p, pred.targets
    idx = {n: i for i, n in enumerate(pred.names)}
    rows = [idx[n] for n in order]
    return order, p[rows], pred.targets[rows]


def _temperature(run: Path) -> float:
    return float((json.loads((run / "model.json").read_text())["calibration"] or {}).get("temperature", 1.0))


def load_fold(ens: Path, member_cvs: list[Path], fold: str) -> dict[str, Split]:
    """Validation and test splits of one fold; member logits from the member cvs' saved probabilities."""
    member_dirs = sorted((ens / fold / "run" / "members").iterdir())
    out = {}
    for split in ("validation", "evaluation"):
        names, saved, y = _probs(ens / fold / split / "predictions.csv")
        logits = []
        for cv, mdir in zip(member_cvs, member_dirs):
            t = _temperature(mdir)
            if abs(t - _temperature(cv / fold / "run")) > 1e-12:
                raise SystemExit(f"{cv / fold}: temperature differs from the ensemble member {mdir.name}")
            logits.append(np.log(np.clip(_probs(cv / fold / split / "predictions.csv", names)[1], 1e-6, None)) * t)
        out[split] = Split(names, y, logits, saved, _temperature(ens / fold / "run"))
    t_ens = out["evaluation"].t_ens
    temps = [_temperature(d) for d in member_dirs]
    rebuilt = softmax(combine(out["evaluation"].members, temps) / t_ens, axis=1)
    gap = float(np.abs(rebuilt - out["evaluation"].saved).max())
    if gap > 1e-4:
        raise SystemExit(f"{ens / fold}: members do not reproduce the ensemble's test probabilities (max |dp| {gap})")
    return out


def combine(members: Members, temps: list[float]) -> np.ndarray:
    """The ensemble's logits: log of the mean of the members' probabilities at temperatures ``temps``."""
    logp = np.stack([log_softmax(z / t, axis=1) for z, t in zip(members, temps)])
    return logsumexp(logp, axis=0) - math.log(len(members))


# ------------------------------------------------------------------------------------ calibrators
def member_temps(members: Members, y: np.ndarray, how: str) -> list[float]:
    """Member temperatures as today (``calibrate``: none or NLL temperature, chosen on held-out validation),
    or all 1 (``raw``: the members' own calibration dropped, the ensemble's alone)."""
    if how == "raw":
        return [1.0] * len(members)
    return [float(calibrate(z, y)["temperature"]) for z in members]


def _t_grid_argmin(objective: Callable[[float], float]) -> float:
    """ECE is a step function of T: a grid on log T (0.5 % steps), not a local optimiser; ties -> T nearest 1."""
    grid = np.exp(np.linspace(math.log(0.3), math.log(3.0), 463))
    vals = np.array([objective(t) for t in grid])
    best = np.flatnonzero(vals <= vals.min() + 1e-12)
    return float(grid[best[np.argmin(np.abs(np.log(grid[best])))]])


def temp_ece(x: np.ndarray, y: np.ndarray) -> float:
    return _t_grid_argmin(lambda t: expected_calibration_error(softmax(x / t, axis=1), y, N_BINS))


def _bin_gaps(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(N, 15) per-image ``correct - confidence`` in its confidence bin's column (bins as ``reliability_bins``)."""
    conf = p.max(1)
    edges = np.linspace(0.0, 1.0, N_BINS + 1)
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, N_BINS - 1)
    out = np.zeros((len(conf), N_BINS))
    out[np.arange(len(conf)), idx] = (p.argmax(1) == y) - conf
    return out


def temp_bootstrap_ece(x: np.ndarray, y: np.ndarray, groups: np.ndarray, n_boot: int = 30, seed: int = 0) -> float:
    """T minimising the mean ECE over patient-bootstrap resamples of the validation set (smoother than one ECE).
    A resample is a multiplicity per image, so all resamples' ECEs at one T are one matrix product."""
    rng = np.random.default_rng(seed)
    uniq, inv = np.unique(groups, return_inverse=True)
    counts = np.stack([np.bincount(rng.integers(0, len(uniq), len(uniq)), minlength=len(uniq))[inv]
                       for _ in range(n_boot)]).astype(np.float64)  # (B, N) times each image is drawn
    sizes = counts.sum(1)
    return _t_grid_argmin(lambda t: float(np.mean(
        np.abs(counts @ _bin_gaps(softmax(x / t, axis=1), y)).sum(1) / sizes)))


def temp_match(x: np.ndarray, y: np.ndarray) -> float:
    """T at which the mean top-class probability equals the accuracy (ECE with one bin is zero)."""
    acc = float((x.argmax(1) == y).mean())
    res = minimize_scalar(lambda lt: (softmax(x * math.exp(-lt), axis=1).max(1).mean() - acc) ** 2,
                          bounds=(math.log(T_MIN), math.log(T_MAX)), method="bounded", options={"xatol": 1e-6})
    return float(math.exp(res.x))


def fit_affine(x: np.ndarray, y: np.ndarray, full: bool, l2: float) -> tuple[np.ndarray, np.ndarray]:
    """``z = x @ W.T + b`` minimising NLL + l2 * (off-diagonal W^2 + b^2) (Kull et al. 2019, ODIR), with
    ``full=False`` W = I / T fixed from the temperature fit and only the bias b learnt (temperature + bias)."""
    n, k = x.shape
    onehot = np.eye(k)[y]
    t = fit_temperature(x, y)
    off = 1.0 - np.eye(k)

    def unpack(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not full:
            return np.eye(k) / t, theta
        return theta[:k * k].reshape(k, k), theta[k * k:]

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = unpack(theta)
        logp = log_softmax(x @ w.T + b, axis=1)
        g = (np.exp(logp) - onehot) / n
        loss = -logp[np.arange(n), y].mean() + l2 * (np.sum((w * off) ** 2) + np.sum(b ** 2))
        gb = g.sum(0) + 2 * l2 * b
        if not full:
            return float(loss), gb
        return float(loss), np.r_[(g.T @ x + 2 * l2 * w * off).ravel(), gb]

    start = np.zeros(k) if not full else np.r_[(np.eye(k) / t).ravel(), np.zeros(k)]
    res = minimize(objective, start, jac=True, method="L-BFGS-B", options={"maxiter": 1000})
    return unpack(res.x)


# --------------------------------------------------------------------------------------- methods
@dataclass
class Method:
    name: str
    params: int  # free parameters of the ensemble-level step (for ties)
    what: str
    fit: Callable[..., Apply]  # (members, y, groups, pool) -> apply


def _ens(members_how: str, step: Callable[[np.ndarray, np.ndarray, np.ndarray], Callable[[np.ndarray], np.ndarray]],
         ) -> Callable[..., Apply]:
    def fit(members: Members, y: np.ndarray, groups: np.ndarray, pool=None) -> Apply:
        temps = member_temps(members, y, members_how)
        f = step(combine(members, temps), y, groups)
        return lambda ms: softmax(f(combine(ms, temps)), axis=1)
    return fit


def _scale(t_of: Callable[[np.ndarray, np.ndarray, np.ndarray], float]):
    def step(x, y, g):
        t = t_of(x, y, g)
        return lambda z: z / t
    return step


def _today_step(x, y, g):
    cal = calibrate(x, y)
    return lambda z: z / cal["temperature"]


def _always_step(x, y, g):
    cal = calibrate(x, y, methods=ENSEMBLE_METHODS)  # the shipped code path (what ensemble.combine calls)
    return lambda z: z / cal["temperature"]


def _vector_step(x, y, g):
    w, b = fit_vector_scaling(x, y)
    return lambda z: z * w + b


def _affine_step(full: bool, l2: float):
    def step(x, y, g):
        w, b = fit_affine(x, y, full, l2)
        return lambda z: z @ w.T + b
    return step


def top_isotonic(p: np.ndarray, conf_in: np.ndarray, conf_out: np.ndarray) -> np.ndarray:
    """Replace each row's top probability ``c`` by ``g(c)`` (``conf_in -> conf_out``, a monotone map) and scale the
    others by ``(1 - g) / (1 - c)``; ``g`` is floored so the top class stays on top (class ranking kept)."""
    c = p.max(1)
    second = np.sort(p, axis=1)[:, -2]
    g = np.interp(c, conf_in, conf_out)
    g = np.clip(np.maximum(g, second / np.clip(1 - c + second, 1e-12, None) + 1e-9), 0.0, 1.0)  # strictly on top
    scale = (1 - g) / np.clip(1 - c, 1e-12, None)
    out = p * scale[:, None]
    out[np.arange(len(p)), p.argmax(1)] = g
    return out


def _isotonic_fit(members: Members, y: np.ndarray, groups: np.ndarray, pool=None) -> Apply:
    """Members as today -> ensemble T (NLL) -> top-label isotonic map of the confidence, fitted on validation."""
    from sklearn.isotonic import IsotonicRegression

    temps = member_temps(members, y, "today")
    x = combine(members, temps)
    t = fit_temperature(x, y)
    p = softmax(x / t, axis=1)
    k = p.shape[1]
    iso = IsotonicRegression(y_min=1.0 / k, y_max=1.0, out_of_bounds="clip").fit(p.max(1), p.argmax(1) == y)
    xs = np.r_[0.0, iso.X_thresholds_, 1.0]
    ys = np.r_[iso.y_thresholds_[0], iso.y_thresholds_, iso.y_thresholds_[-1]]
    return lambda ms: top_isotonic(softmax(combine(ms, temps) / t, axis=1), xs, ys)


def _pooled_fit(members: Members, y: np.ndarray, groups: np.ndarray, pool=None) -> Apply:
    """Members as today; one ensemble temperature fitted on this fold's (training) validation logits plus the other
    folds' saved validation logits (``pool``: images of this fold's scored or test part already removed)."""
    temps = member_temps(members, y, "today")
    x = combine(members, temps)
    px, py = pool
    t = fit_temperature(np.concatenate([x, px]), np.concatenate([y, py]))
    return lambda ms: softmax(combine(ms, temps) / t, axis=1)


METHODS = [
    Method("today", 1, "member T (NLL, none/T chosen on held-out val) -> log-mean -> ensemble T (NLL, same rule)",
           _ens("today", _today_step)),
    Method("ens-none", 0, "member T as today -> log-mean; no ensemble-level step",
           _ens("today", lambda x, y, g: lambda z: z)),
    Method("ens-T-always", 1, "member T as today -> ensemble T (NLL), always applied (`calibrate(methods="
                              "ENSEMBLE_METHODS)`)", _ens("today", _always_step)),
    Method("raw-members+ens-T", 1, "no member temperatures (T=1) -> log-mean -> ensemble T (NLL)",
           _ens("raw", _scale(lambda x, y, g: fit_temperature(x, y)))),
    Method("ens-T-ece", 1, "member T as today -> ensemble T minimising validation ECE (grid)",
           _ens("today", _scale(lambda x, y, g: temp_ece(x, y)))),
    Method("ens-T-boot-ece", 1, "member T as today -> ensemble T minimising mean ECE over 30 patient bootstraps",
           _ens("today", _scale(temp_bootstrap_ece))),
    Method("ens-T-match", 1, "member T as today -> ensemble T with mean confidence = accuracy",
           _ens("today", _scale(lambda x, y, g: temp_match(x, y)))),
    Method("ens-T+bias", 7, "member T as today -> ensemble T (NLL) then per-class bias (L2 1e-3)",
           _ens("today", _affine_step(False, 1e-3))),
    Method("ens-vector", 12, "member T as today -> vector scaling (per-class w, b; L2 1e-3 to identity)",
           _ens("today", _vector_step)),
    Method("ens-dirichlet-0.01", 42, "member T as today -> Dirichlet-lite: full W on log-probs + b (ODIR L2 0.01)",
           _ens("today", _affine_step(True, 1e-2))),
    Method("ens-dirichlet-0.1", 42, "member T as today -> Dirichlet-lite: full W on log-probs + b (ODIR L2 0.1)",
           _ens("today", _affine_step(True, 1e-1))),
    Method("ens-T+top-isotonic", 20, "member T as today -> ensemble T (NLL) -> isotonic map of the top-class "
                                     "probability (ranking kept); ~20 steps", _isotonic_fit),
    Method("pooled-val-T", 1, "member T as today -> ensemble T (NLL) on this fold's + the other folds' validation "
                              "logits (this fold's scored/test images excluded)", _pooled_fit),
]


# ------------------------------------------------------------------------------------ evaluation
def nll_of(p: np.ndarray, y: np.ndarray) -> float:
    return float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None)).mean())


def pool_for(folds: dict[str, dict[str, Split]], fold: str, exclude: set[str]) -> tuple[np.ndarray, np.ndarray]:
    """Other folds' ensemble validation logits (``log p * T_ens``: their saved probabilities with the ensemble
    temperature undone), without any image named in ``exclude``."""
    xs, ys = [], []
    for f, s in folds.items():
        if f == fold:
            continue
        v = s["validation"]
        keep = np.array([n not in exclude for n in v.names])
        xs.append(np.log(np.clip(v.saved[keep], 1e-6, None)) * v.t_ens)
        ys.append(v.y[keep])
    return np.concatenate(xs), np.concatenate(ys)


def inner_oof(method: Method, folds: dict, fold: str, repeats: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Out-of-fold validation probabilities of one fold, per repeat (patient-grouped stratified 5-fold)."""
    from sklearn.model_selection import StratifiedGroupKFold

    v: Split = folds[fold]["validation"]
    groups = v.groups
    out = []
    for r in range(repeats):
        oof = np.zeros_like(v.members[0])
        splitter = StratifiedGroupKFold(n_splits=5, shuffle=True, random_state=r)
        for tr, te in splitter.split(v.members[0], v.y, groups):
            pool = None
            if method.name == "pooled-val-T":
                pool = pool_for(folds, fold, set(v.names) | set(folds[fold]["evaluation"].names))
            apply = method.fit([z[tr] for z in v.members], v.y[tr], groups[tr], pool)
            oof[te] = apply([z[te] for z in v.members])
        out.append((oof, v.y))
    return out


def validation_scores(folds: dict, repeats: int) -> dict[str, dict[str, float]]:
    scores = {}
    for m in METHODS:
        t0 = time.perf_counter()
        per_fold = {f: inner_oof(m, folds, f, repeats) for f in folds}
        eces, nlls, fold_eces = [], [], []
        for r in range(repeats):
            p = np.concatenate([per_fold[f][r][0] for f in folds])
            y = np.concatenate([per_fold[f][r][1] for f in folds])
            eces.append(expected_calibration_error(p, y, N_BINS))
            nlls.append(nll_of(p, y))
            fold_eces.append(np.mean([expected_calibration_error(*per_fold[f][r], N_BINS) for f in folds]))
        scores[m.name] = {"ece": float(np.mean(eces)), "ece_sd": float(np.std(eces)), "nll": float(np.mean(nlls)),
                          "fold_ece": float(np.mean(fold_eces)), "seconds": time.perf_counter() - t0}
        print(f"validation {m.name:20s} pooled OOF ECE {scores[m.name]['ece']:.4f} ± {scores[m.name]['ece_sd']:.4f} "
              f"NLL {scores[m.name]['nll']:.4f} mean fold ECE {scores[m.name]['fold_ece']:.4f} "
              f"({scores[m.name]['seconds']:.1f} s)", flush=True)
    return scores


def choose(scores: dict[str, dict[str, float]], tie: float) -> tuple[str, str]:
    ok = [m for m in METHODS if scores[m.name]["nll"] <= scores["today"]["nll"] + 1e-9]
    best = min(ok, key=lambda m: scores[m.name]["ece"])
    near = [m for m in ok if scores[m.name]["ece"] <= scores[best.name]["ece"] + tie]
    pick = min(near, key=lambda m: (m.params, scores[m.name]["ece"]))
    why = (f"lowest pooled out-of-fold validation ECE among methods whose out-of-fold NLL is not above today's: "
           f"{best.name} ({scores[best.name]['ece']:.4f}); within {tie} of it, fewest parameters: {pick.name}")
    return pick.name, why


def test_scores(folds: dict) -> dict[str, dict[str, float]]:
    out = {}
    for m in METHODS:
        ps, ys, per = [], [], []
        for f, s in folds.items():
            v, t = s["validation"], s["evaluation"]
            pool = pool_for(folds, f, set(t.names)) if m.name == "pooled-val-T" else None
            p = m.fit(v.members, v.y, v.groups, pool)(t.members)
            ps.append(p)
            ys.append(t.y)
            per.append(expected_calibration_error(p, t.y, N_BINS))
        p, y = np.concatenate(ps), np.concatenate(ys)
        out[m.name] = {"ece": expected_calibration_error(p, y, N_BINS), "nll": nll_of(p, y),
                       "accuracy": float((p.argmax(1) == y).mean()), "fold_ece": float(np.mean(per)),
                       "confidence": float(p.max(1).mean())}
    return out


def noise_floor(p: np.ndarray, observed: float, n_sim: int = 2000, seed: int = 0) -> dict[str, float]:
    """The 15-bin ECE of a *perfectly calibrated* model with these top-class confidences (each prediction correct
    with probability equal to its confidence), over ``n_sim`` draws: its mean, 95th percentile, the share of draws
    above 0.05 and the share at or above ``observed``: how large an ECE sampling alone gives on this many images."""
    rng = np.random.default_rng(seed)
    conf = p.max(1)
    k = p.shape[1]
    sims = []
    for _ in range(n_sim):
        correct = rng.random(len(conf)) < conf
        y = np.where(correct, p.argmax(1), (p.argmax(1) + 1) % k)
        sims.append(expected_calibration_error(p, y, N_BINS))
    sims = np.array(sims)
    return {"mean": float(sims.mean()), "p95": float(np.quantile(sims, 0.95)), "above_target": float(
        (sims > 0.05).mean()), "at_least_observed": float((sims >= observed).mean()), "n_sim": n_sim}


def report(args, folds, val, chosen, why, test, today_gap, floor, wall) -> str:
    n_val = sum(len(s["validation"].y) for s in folds.values())
    n_test = sum(len(s["evaluation"].y) for s in folds.values())
    lines = [
        "# Calibration of the default model (`ensemble` preset): methods compared post hoc",
        "",
        f"**Data:** the saved predictions of `{args.ensemble_cv}` (5 official MSLD v2.0 folds; {n_val} validation and "
        f"{n_test} test predictions) and of its members' cvs ({', '.join(str(c) for c in args.member_cvs)}, the same "
        "weights, checked by the member temperatures and by rebuilding the ensemble's saved test probabilities: "
        f"max |dp| {today_gap:.1e}). No retraining; the members' raw logits are `log p * T`.  ",
        f"**Command:** `python benchmarks/calibration_posthoc.py {args.ensemble_cv} "
        f"{' '.join(str(c) for c in args.member_cvs)} --repeats {args.repeats} --out {args.out}`  ",
        f"**Wall time:** {wall[0]:.0f} s for {wall[1]:.0f} s of CPU on 2 shared CPU cores (one thread; load "
        f"average {wall[2]:.1f} at the end{', contended' if wall[2] > 2.5 else ''}).  ",
        "**ECE:** 15 equal-width bins on the top-class probability, pooled over all folds' predictions as in "
        "`cv_report.md`.",
        "",
        "## How the method was chosen (validation only)",
        "",
        "Inside each fold's validation part the whole pipeline (member temperatures where the method has them, then "
        "the ensemble step) is fitted on 4/5 of the patients and applied to the other 1/5 (stratified group 5-fold "
        f"by patient, {args.repeats} random partitions); the out-of-fold validation probabilities of the five folds "
        "are pooled and scored. Rule, fixed before any test number was computed: lowest mean pooled out-of-fold ECE "
        "among methods whose out-of-fold NLL is not above today's; a method within "
        f"{args.tie} ECE of that one with fewer parameters wins instead.",
        "",
        f"**Chosen: `{chosen}`** — {why}.",
        "",
        "| method | what | params | val OOF ECE pooled (± sd over partitions) | val OOF NLL | val OOF ECE, mean of "
        "folds | **test ECE pooled** | test ECE, mean of folds | test NLL | test accuracy % | test mean confidence |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in METHODS:
        v, t = val[m.name], test[m.name]
        mark = " **(chosen)**" if m.name == chosen else ""
        lines.append(f"| `{m.name}`{mark} | {m.what} | {m.params} | {v['ece']:.4f} ± {v['ece_sd']:.4f} | "
                     f"{v['nll']:.4f} | {v['fold_ece']:.4f} | {t['ece']:.4f} | {t['fold_ece']:.4f} | {t['nll']:.4f} | "
                     f"{100 * t['accuracy']:.1f} | {t['confidence']:.3f} |")
    c = test[chosen]
    met = "meets" if c["ece"] <= 0.05 else "does not meet"
    lines += [
        "",
        "## Result",
        "",
        f"Pooled test ECE of the chosen method: **{c['ece']:.4f}** ({met} the ≤ 0.05 target); today's configuration "
        f"(`today`, as saved by the cv): {test['today']['ece']:.4f}. A perfectly calibrated model with the chosen "
        f"method's test confidences (each prediction right with probability equal to its confidence; "
        f"{floor['n_sim']} draws) shows a 15-bin ECE of {floor['mean']:.3f} on average over {n_test} predictions "
        f"(95th percentile {floor['p95']:.3f}); {100 * floor['above_target']:.0f} % of its draws exceed 0.05 and "
        f"{100 * floor['at_least_observed']:.0f} % reach the observed {c['ece']:.4f}. So the observed test ECE is "
        "what sampling alone gives a perfectly calibrated model on this many images, and differences of a few "
        "thousandths between methods (or a target of 0.05 on 364 predictions) cannot be resolved. This is a "
        "re-analysis of saved predictions, not a fresh cross-validation.",
        "",
        "## Notes",
        "",
        "- Order of work: a validation-only run (`--validation-only`, 1 then 5 partitions) came first; the "
        "`ens-T+top-isotonic` candidate was added after it (still without any test number), then the first full "
        "run, which printed the choice before computing any test number. This table is a rerun with two changes "
        "that leave every number as it was: the `ens-T-always` row calls the shipped "
        "`calibrate(methods=ENSEMBLE_METHODS)` instead of `fit_temperature` (the same fit), and the bootstrap ECE "
        "is computed as one matrix product (the same resamples). The rule above was written before the first run. "
        "The `pooled-val-T` test ECE (0.053) was already printed in the cv report before this work; it did not "
        "enter the rule.",
        f"- The only method at or below 0.05 on test, `ens-dirichlet-0.1` ({test['ens-dirichlet-0.1']['ece']:.4f}), "
        f"ranks poorly on validation (out-of-fold ECE {val['ens-dirichlet-0.1']['ece']:.4f}, NLL "
        f"{val['ens-dirichlet-0.1']['nll']:.4f} above today's) and changes predictions (test accuracy "
        f"{100 * test['ens-dirichlet-0.1']['accuracy']:.1f} %); picking it would be choosing on test, and its "
        "margin is far inside the sampling noise above.",
        "- Implemented: `ensemble.combine` now calls `calibrate(..., methods=ENSEMBLE_METHODS)` (always the "
        "ensemble's temperature; members unchanged). It changes no probability of these five folds, whose gates "
        "all chose the temperature; older `model.json` files load and predict as before (nothing new is stored).",
        "- `ens-T-always` differs from `today` only in the gate: `calibrate()` applies the ensemble temperature only "
        "when 5-fold held-out validation says it lowers NLL without raising ECE. On ~30 held-out images that ECE "
        "check is noisy and sometimes keeps `none` (inner splits); on each fold's full validation part all five "
        "folds chose the temperature anyway, so the chosen method's test probabilities equal today's.",
        "- Per-fold test ECEs (~0.10) are far above the pooled one because each fold has only 63–82 test images: "
        "ECE is biased upwards on small sets, which is why the target is the pooled figure.",
        "- Member-level vs ensemble-level: dropping the members' own temperatures (`raw-members+ens-T`) gives the "
        "lowest single-parameter NLL but a higher ECE on validation; no member-only calibration (`ens-none`) is "
        "clearly worse (the log-mean of two members is underconfident: ensemble temperatures 0.63–0.78 < 1).",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ensemble_cv", type=Path, help="finished cv of the ensemble (read only)")
    ap.add_argument("member_cvs", type=Path, nargs="+", help="finished cvs of its members, in the members' order")
    ap.add_argument("--repeats", type=int, default=5, help="random patient partitions of the inner 5-fold")
    ap.add_argument("--tie", type=float, default=0.002, help="ECE margin within which fewer parameters win")
    ap.add_argument("--validation-only", action="store_true", help="stop after the choice (no test numbers)")
    ap.add_argument("--out", type=Path, help="write the Markdown table here")
    args = ap.parse_args()
    t0, c0 = time.perf_counter(), time.process_time()
    fold_names = sorted(p.name for p in args.ensemble_cv.glob("fold*") if p.is_dir())
    folds = {f: load_fold(args.ensemble_cv, args.member_cvs, f) for f in fold_names}
    val = validation_scores(folds, args.repeats)
    chosen, why = choose(val, args.tie)
    print(f"chosen on validation: {chosen} ({why})", flush=True)
    if args.validation_only:
        return 0
    test = test_scores(folds)
    for m in METHODS:
        print(f"test {m.name:20s} pooled ECE {test[m.name]['ece']:.4f} NLL {test[m.name]['nll']:.4f} "
              f"acc {100 * test[m.name]['accuracy']:.1f}")
    saved = np.concatenate([s["evaluation"].saved for s in folds.values()])
    y = np.concatenate([s["evaluation"].y for s in folds.values()])
    today_gap = float(np.abs(saved - np.concatenate([
        METHODS[0].fit(s["validation"].members, s["validation"].y, s["validation"].groups)(s["evaluation"].members)
        for s in folds.values()])).max())
    print(f"today rebuilt vs saved: max |dp| {today_gap:.2e}; saved pooled ECE "
          f"{expected_calibration_error(saved, y, N_BINS):.4f}")
    chosen_p = np.concatenate([next(m for m in METHODS if m.name == chosen).fit(
        s["validation"].members, s["validation"].y, s["validation"].groups,
        pool_for(folds, f, set(s["evaluation"].names)) if chosen == "pooled-val-T" else None)(s["evaluation"].members)
        for f, s in folds.items()])
    floor = noise_floor(chosen_p, test[chosen]["ece"])
    print(f"perfectly calibrated null: {floor}")
    if args.out:
        wall = (time.perf_counter() - t0, time.process_time() - c0, os.getloadavg()[0])
        args.out.write_text(report(args, folds, val, chosen, why, test, today_gap, floor, wall))
    return 0


if __name__ == "__main__":
    sys.exit(main())
