"""Would a weighted average of two members beat the ensemble's equal weights, on validation?

Like ``posthoc_members.py`` (each fold's ensemble calibration refitted on its validation part, applied to its test
part), but the members' calibrated probabilities are mixed as ``w * first + (1 - w) * second`` for w in 0.3 ... 0.7
(w = 0.5 is the ensemble's own rule). Choose on the validation columns only; test is reported, never used to choose.

    python benchmarks/posthoc_weights.py runs/cv_default runs/cv_lite2_frozen224
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from posthoc_members import member_probs, scores, softmax  # noqa: E402

from mpoxscope.engine.calibration import apply_calibration, calibrate  # noqa: E402

WEIGHTS = (0.3, 0.4, 0.5, 0.6, 0.7)


def pooled_scores(first: Path, second: Path, w: float) -> dict[str, tuple[float, float]]:
    """Pooled (accuracy, macro-F1) in % on validation and test for weight ``w`` on ``first``."""
    pooled: dict[str, tuple[list, list]] = {"validation": ([], []), "evaluation": ([], [])}
    for fold in sorted(p.name for p in first.glob("fold*")):
        logits = {}
        for split in pooled:
            p0, y, order = member_probs(first, fold, split, None)
            p1 = member_probs(second, fold, split, order)[0]
            logits[split] = (np.log(w * p0 + (1 - w) * p1), y)
        cal = calibrate(*logits["validation"])
        for split, (lg, y) in logits.items():
            pooled[split][0].append(y)
            pooled[split][1].append(softmax(apply_calibration(lg, cal)))
    return {s: scores(np.concatenate(ys), np.concatenate(ps)) for s, (ys, ps) in pooled.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("first", type=Path, help="finished cv output folder of the first member")
    ap.add_argument("second", type=Path, help="finished cv output folder of the second member (same folds)")
    args = ap.parse_args()
    for w in WEIGHTS:
        s = pooled_scores(args.first, args.second, w)
        print(f"w={w}: pooled validation acc {s['validation'][0]:.2f} F1 {s['validation'][1]:.2f} | "
              f"pooled test acc {s['evaluation'][0]:.2f} F1 {s['evaluation'][1]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
