"""Post-hoc ensemble of two finished cross-validations on the same folds, from their prediction files alone.

For each fold, average the calibrated class probabilities that ``A/<fold>/{validation,evaluation}/predictions.csv``
and ``B/<fold>/...`` hold (weight ``w`` on A), and report validation and test accuracy / macro-F1 per fold and
pooled. Whether to use the ensemble is decided on the validation numbers only; the test numbers are reported
beside them, never used to choose.

    python benchmarks/posthoc_ensemble.py runs/cv_default runs/cv_frozen_old
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, f1_score


def read(path: Path) -> tuple[list[str], np.ndarray, list[str], list[str]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    classes = [c for c in rows[0] if c not in ("filename", "true", "predicted", "confidence")]
    return [r["filename"] for r in rows], np.array([[float(r[c]) for c in classes] for r in rows]), \
        [r["true"] for r in rows], classes


def fold_scores(a: Path, b: Path, split: str, w: float) -> dict:
    names_a, pa, ya, classes = read(a / split / "predictions.csv")
    names_b, pb, _, classes_b = read(b / split / "predictions.csv")
    assert classes == classes_b, "the two runs have different classes"
    order = {n: i for i, n in enumerate(names_b)}
    pb = pb[[order[n] for n in names_a]]
    y = np.array([classes.index(t) for t in ya])
    out = {}
    for name, p in (("A", pa), ("B", pb), ("ensemble", w * pa + (1 - w) * pb)):
        pred = p.argmax(1)
        out[name] = {"accuracy": accuracy_score(y, pred), "f1_macro": f1_score(y, pred, average="macro"),
                     "y": y, "pred": pred}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--weight", type=float, default=0.5, help="weight of A's probabilities (default 0.5)")
    args = ap.parse_args()
    folds = sorted(p.name for p in args.a.glob("fold*")
                   if all((r / p.name / "evaluation" / "predictions.csv").is_file() for r in (args.a, args.b)))
    pooled: dict = {}
    print(f"A = {args.a}, B = {args.b}, ensemble = {args.weight:g} A + {1 - args.weight:g} B")
    print("fold   split       A acc / F1       B acc / F1       ensemble acc / F1")
    for fold in folds:
        for split, folder in (("validation", "validation"), ("test", "evaluation")):
            s = fold_scores(args.a / fold, args.b / fold, folder, args.weight)
            print(f"{fold}  {split:10s}  " + "  ".join(f"{100 * s[k]['accuracy']:6.2f} / {100 * s[k]['f1_macro']:5.2f}"
                                                       for k in ("A", "B", "ensemble")))
            for k in ("A", "B", "ensemble"):
                pooled.setdefault((split, k), ([], []))
                pooled[(split, k)][0].append(s[k]["y"])
                pooled[(split, k)][1].append(s[k]["pred"])
    for split in ("validation", "test"):
        cells = []
        for k in ("A", "B", "ensemble"):
            y, p = (np.concatenate(v) for v in pooled[(split, k)])
            cells.append(f"{100 * accuracy_score(y, p):6.2f} / {100 * f1_score(y, p, average='macro'):5.2f}")
        print(f"pooled {split:10s}  " + "  ".join(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
