"""Would an ensemble of two finished cross-validations' models win, by the ensemble's own rule, on validation?

For each fold, the members' saved calibrated probabilities (``<cv>/<fold>/{validation,evaluation}/predictions.csv``)
are combined as ``mpoxscope`` combines ensemble members (log of the mean probability), then the ensemble's own
calibration is fitted on that fold's validation part (``calibration.calibrate``) and applied to its test part.
Prints validation and test accuracy / macro-F1 per fold and pooled, and pooled test ECE (15 bins), for each member
and for the ensemble. Adopt the ensemble only if it wins on validation; test numbers are reported, never used to
choose.

    python benchmarks/posthoc_members.py runs/cv_default runs/cv_lite2_frozen224
    python benchmarks/posthoc_members.py --rule mean-log runs/cv_default runs/cv_lite2_frozen224  # geometric mean
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, f1_score

from mpoxscope.engine.calibration import apply_calibration, calibrate, expected_calibration_error
from mpoxscope.engine.screening import read_predictions_csv


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def scores(y: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    pred = p.argmax(1)
    return 100 * accuracy_score(y, pred), 100 * f1_score(y, pred, average="macro")


def member_probs(cv: Path, fold: str, split: str, order: list[str] | None) -> tuple[np.ndarray, np.ndarray, list]:
    """One member's calibrated probabilities as its cv wrote them (what the ensemble averages), rows in ``order``
    (default: the file's)."""
    pred, _ = read_predictions_csv(cv / fold / split / "predictions.csv")
    p = pred.probs / pred.probs.sum(1, keepdims=True)  # saved with 6 decimals
    if order is not None:
        idx = {n: i for i, n in enumerate(pred.names)}
        rows = [idx[n] for n in order]
        return p[rows], pred.targets[rows], order
    return p, pred.targets, pred.names


def combine(probs: list[np.ndarray], rule: str) -> np.ndarray:
    """Ensemble logits of members' probabilities, each (n, classes): ``log-mean`` is mpoxscope's rule (log of the
    mean probability); ``mean-log`` the geometric mean (mean of the log-probabilities), a candidate alternative."""
    if rule == "log-mean":  # saved probabilities may round to 0 (6 decimals): a floor keeps the log finite
        return np.log(np.clip(np.mean(probs, axis=0), 1e-6, 1.0))
    return np.mean(np.log(np.clip(probs, 1e-6, 1.0)), axis=0)  # saved probabilities may round to 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cvs", type=Path, nargs="+", help="finished cv output folders (same folds)")
    ap.add_argument("--rule", choices=("log-mean", "mean-log"), default="log-mean",
                    help="how members are combined (default: mpoxscope's own rule)")
    args = ap.parse_args()
    folds = [p.name for p in sorted(args.cvs[0].glob("fold*"))]
    names = [c.name for c in args.cvs] + ["ensemble"]
    pooled: dict = {}
    for fold in folds:
        split_probs = {}
        for split in ("validation", "evaluation"):
            first, y, order = member_probs(args.cvs[0], fold, split, None)
            probs = [first] + [member_probs(c, fold, split, order)[0] for c in args.cvs[1:]]
            split_probs[split] = (probs, y)
        (vp, vy), (tp, ty) = split_probs["validation"], split_probs["evaluation"]
        cal = calibrate(combine(vp, args.rule), vy)
        ens_val, ens_test = (softmax(apply_calibration(combine(ps, args.rule), cal)) for ps in (vp, tp))
        rows = {"validation": (vp + [ens_val], vy), "test": (tp + [ens_test], ty)}
        for split, (ps, y) in rows.items():
            cells = []
            for name, p in zip(names, ps):
                pooled.setdefault((split, name), ([], []))
                pooled[(split, name)][0].append(y)
                pooled[(split, name)][1].append(p)
                cells.append(f"{name} " + "{:5.1f}/{:5.1f}".format(*scores(y, p)))
            print(f"{fold} {split:10s} " + "  ".join(cells))
    for split in ("validation", "test"):
        cells = []
        for name in names:
            y, p = (np.concatenate(v) for v in pooled[(split, name)])
            cells.append(f"{name} " + "acc {:5.2f} F1 {:5.2f}".format(*scores(y, p))
                         + f" ECE {expected_calibration_error(p, y, 15):.3f}")
        print(f"pooled {split:10s} " + " | ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
