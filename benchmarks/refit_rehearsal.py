"""Write the split file that rehearses ``--refit`` on validation (recipe_search.md #46).

In each official fold the training part is split by patient into A, which plays "training", and B, which plays
"validation" (A's share of the training part is the real training part's share of training + validation); the
fold's real validation part plays "test". A ``cv`` on this file therefore trains on A, makes every choice on B,
refits (with ``--refit``) on A + B, and scores on images that no step has seen — the refit's gain measured on
validation data, never on test data::

    python benchmarks/refit_rehearsal.py --out runs/rehearsal.csv          # seconds
    mpoxscope cv ../shared/data/msld_v2 --split-file runs/rehearsal.csv --out runs/reh_r0 \\
        --ensemble tf_efficientnet_lite0 tf_efficientnet_lite2@probe/260 --no-refit
    # then the same command with --refit (or --refit-trained) on a copy of runs/reh_r0: members are reused

The cv's "test" numbers of such a run are validation numbers; its report says test because the split file says so.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from sklearn.model_selection import GroupShuffleSplit

from mpoxscope.data.protocol import resolve_folds
from mpoxscope.data.samples import load_samples, msld_root


def rehearsal_rows(seed: int = 0) -> list[tuple[str, str, str]]:
    """``(fold, split, filename)`` rows: A as train, B as validation, the real validation part as test."""
    data = load_samples(msld_root())
    folds, _ = resolve_folds(data, msld_root() / "datalog.xlsx")
    groups, names = np.array(data.groups), [s.path.name for s in data.samples]
    rows = []
    for f in folds:
        tr = np.array(f.train)
        share = len(tr) / (len(tr) + len(f.validation))
        a, b = next(GroupShuffleSplit(1, train_size=share, random_state=seed).split(tr, groups=groups[tr]))
        for split, idx in (("train", tr[a]), ("validation", tr[b]), ("test", f.validation)):
            rows += [(f.name, split, names[i]) for i in idx]
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="CSV to write (fold,split,filename)")
    ap.add_argument("--seed", type=int, default=0, help="the A/B draw (0 = recipe_search #43's draw 0)")
    args = ap.parse_args()
    if args.out.exists():
        raise SystemExit(f"{args.out}: exists; not overwritten")
    rows = rehearsal_rows(args.seed)
    args.out.write_text("fold,split,filename\n" + "".join(f"{f},{s},{n}\n" for f, s, n in rows))
    for fold in sorted({r[0] for r in rows}):
        sizes = {s: sum(1 for r in rows if r[0] == fold and r[1] == s) for s in ("train", "validation", "test")}
        print(f"{fold}: A {sizes['train']}, B {sizes['validation']}, real validation {sizes['test']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
