"""Would testing the fine-tuned Lite0 member at a higher resolution help? (recipe_search.md #52; FixRes effect)

The Lite0 member trains on RandomResizedCrop(scale 0.6-1) at 224 px, so objects look ~1.14x larger in training than
in the whole-photo resize it is evaluated on (Touvron et al. 2019, "Fixing the train-test resolution discrepancy").
For each fold of a finished two-member cv (Lite0 + probe, e.g. `--ensemble tf_efficientnet_lite0
tf_efficientnet_lite2@probe/260` before any refit), the Lite0 member's raw logits on the validation part are computed
at each size S (its own test-time views; the input resized as the ensemble resizes it), its temperature refitted on
validation, and the pair re-combined by the ensemble's rule (log of the mean probability, ensemble temperature).
Prints per fold and pooled validation macro-F1 / NLL for each fixed S and for S chosen per fold by ensemble
validation NLL. Validation only: no test image is read.

    python benchmarks/fixres_posthoc.py runs/cv_l0_probe --sizes 224 256 288 --cache runs/fixres_val.npz
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score, log_loss
from torch.nn import functional as F

from mpoxscope.data.images import load_image
from mpoxscope.data.samples import load_samples, msld_root
from mpoxscope.data.transforms import eval_transform
from mpoxscope.engine.calibration import ENSEMBLE_METHODS, apply_calibration, calibrate
from mpoxscope.engine.checkpoint import load_inference_model

LITE0, PROBE = "tf_efficientnet_lite0-seed0", "tf_efficientnet_lite2-seed0-probe-260px"


def member_logits(cv: Path, sizes: list[int], data_root: Path) -> dict[str, np.ndarray]:
    """Raw (N, K) logits of each fold's Lite0 member on its validation part at each size, with targets and names."""
    data = load_samples(data_root)
    by_name = {s.filename: s for s in data.samples}
    out: dict[str, np.ndarray] = {}
    for run in sorted(cv.glob("fold*/run")):
        fold = run.parent.name
        names = [str(n) for n in np.load(run / "validation_probs.npz")["names"]]
        model, meta = load_inference_model(run / "members" / LITE0, device="cpu")
        images = [load_image(by_name[n].path).convert("RGB") for n in names]
        out[f"{fold}_names"] = np.array(names)
        out[f"{fold}_y"] = np.array([meta["classes"].index(by_name[n].label) for n in names])
        for s in sizes:
            t0, big = time.time(), max(s, 260)  # the ensemble reads the largest member's side; members resize down
            tf = eval_transform(big, meta["normalization"]["mean"], meta["normalization"]["std"])
            logits = []
            with torch.no_grad():
                for i in range(0, len(images), 16):
                    x = torch.stack([tf(im) for im in images[i:i + 16]])
                    if s != big:
                        x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
                    logits.append(model(x).float())
            out[f"{fold}_S{s}"] = torch.cat(logits).numpy()
            print(f"{fold} S={s}: {len(names)} images, {time.time() - t0:.0f} s", flush=True)
    return out


def softmax(x) -> np.ndarray:
    return torch.softmax(torch.as_tensor(x, dtype=torch.float64), 1).numpy()


def pair(run: Path, y: np.ndarray, logits: np.ndarray, names: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Lite0 calibrated probabilities, ensemble probabilities) on validation, by the ensemble's rule."""
    p_lite0 = softmax(apply_calibration(logits, calibrate(logits, y)))
    probe = np.load(run / "members" / PROBE / "validation_probs.npz")
    if list(probe["names"]) != list(names):
        raise SystemExit(f"{run}: the probe's validation rows differ from the Lite0 member's")
    log_mean = np.log(np.clip((p_lite0 + probe["probs"]) / 2, 1e-12, 1.0))
    return p_lite0, softmax(apply_calibration(log_mean, calibrate(log_mean, y, methods=ENSEMBLE_METHODS)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cv", type=Path, help="finished two-member cv (Lite0 + probe), before any refit")
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 256, 288])
    ap.add_argument("--cache", type=Path, help="npz of the logits: read if present, else written")
    ap.add_argument("--data", type=Path, default=None, help="dataset root (default: $MPOXSCOPE_MSLD)")
    a = ap.parse_args()
    if a.cache and a.cache.exists():
        z = dict(np.load(a.cache))
    else:
        z = member_logits(a.cv, a.sizes, a.data or msld_root())
        if a.cache:
            np.savez(a.cache, **z)
    folds = sorted(k[:-2] for k in z if k.endswith("_y"))
    rows = {(f, s): (z[f"{f}_y"], *pair(a.cv / f / "run", z[f"{f}_y"], z[f"{f}_S{s}"], z[f"{f}_names"]))
            for f in folds for s in a.sizes}
    nll = {k: log_loss(v[0], v[2], labels=range(v[2].shape[1])) for k, v in rows.items()}
    for (f, s), (y, p0, pe) in rows.items():
        print(f"{f} S={s}: Lite0 macro-F1 {100 * f1_score(y, p0.argmax(1), average='macro'):.2f}, ensemble "
              f"{100 * f1_score(y, pe.argmax(1), average='macro'):.2f}, ensemble NLL {nll[(f, s)]:.4f}")
    picks = {f"S={s} on every fold": {f: s for f in folds} for s in a.sizes}
    picks["S per fold by ensemble validation NLL"] = {f: min(a.sizes, key=lambda s: nll[(f, s)]) for f in folds}
    for what, pick in picks.items():
        y, p0, pe = (np.concatenate([rows[(f, pick[f])][i] for f in folds]) for i in range(3))
        print(f"[validation, pooled, {what} {list(pick.values())}] ensemble macro-F1 "
              f"{100 * f1_score(y, pe.argmax(1), average='macro'):.2f}, accuracy "
              f"{100 * accuracy_score(y, pe.argmax(1)):.2f}, NLL {log_loss(y, pe, labels=range(pe.shape[1])):.4f}; "
              f"Lite0 alone macro-F1 {100 * f1_score(y, p0.argmax(1), average='macro'):.2f}")


if __name__ == "__main__":
    main()
