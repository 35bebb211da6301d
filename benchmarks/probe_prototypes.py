"""Post-hoc prototypes for the linear probe (recipe_search.md #40-#41): other poolings and stages of the frozen
trunk, a learning curve on validation, and a refit on training + validation, without building them into the package.

    # 1. every image's features under the 8 d4 views: average pool of stages 4-8, max and GeM pool of the last map
    python benchmarks/probe_prototypes.py features --out runs/l2_260.npz  # ~2.5 min (Lite2 260, 2 cores)
    # 2. a probe on some of them per official fold (C by validation log-loss, temperature on validation); writes
    #    <out>/<fold>/{validation,evaluation}/predictions.csv for benchmarks/posthoc_members.py
    python benchmarks/probe_prototypes.py fit runs/l2_260.npz gap4+gap5+gap6+gap7+gap8+gmp --out runs/cv_multi
    python benchmarks/probe_prototypes.py fit runs/l2_260.npz gap8 --refit --out runs/cv_refit  # post hoc refit
    # 3. pooled validation macro-F1 when training on a patient-grouped fraction of each fold's training part
    python benchmarks/probe_prototypes.py curve runs/l2_260.npz gap8
    # 4. the refit rehearsed inside the training part, scored on the real validation part (#43)
    python benchmarks/probe_prototypes.py simulate runs/l2_260.npz gap8
    python benchmarks/probe_prototypes.py simulate runs/l2_260.npz gap8 --beside runs/cvm3_tf_efficientnet_lite0-seed0

Test numbers are printed by ``fit`` and reported in recipe_search.md, never used to choose.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.special import softmax
from sklearn.metrics import f1_score
from sklearn.model_selection import GroupShuffleSplit

from mpoxscope.config import ModelConfig
from mpoxscope.data.batch_augment import normalise
from mpoxscope.data.protocol import resolve_folds
from mpoxscope.data.samples import load_samples, msld_root
from mpoxscope.engine.calibration import expected_calibration_error, fit_temperature
from mpoxscope.engine.imagecache import build_image_cache
from mpoxscope.engine.probe import C_GRID, fit_logistic
from mpoxscope.models.factory import create_model
from mpoxscope.models.tta import TTA_SETS, VIEWS


@torch.no_grad()
def features(args: argparse.Namespace) -> None:
    data = load_samples(msld_root())
    model = create_model(ModelConfig(backbone=args.backbone, image_size=args.image_size, head="linear"),
                         len(data.classes)).eval()
    idx = list(range(len(data.samples)))
    cache = build_image_cache(data, idx, args.image_size, progress_bar=False)
    t0, out = time.time(), {}
    for s in range(0, len(idx), 16):
        x = normalise(cache.clean.index_select(0, cache.index(idx[s:s + 16])), model.mean, model.std)
        views = []
        for v in TTA_SETS["d4"]:
            h, parts = VIEWS[v](x).contiguous(memory_format=torch.channels_last), {}
            for k, stage in enumerate(model.stages):
                h = stage(h)
                if k >= 4:
                    parts[f"gap{k}"] = h.float().mean((2, 3))
            parts["gmp"] = h.float().amax((2, 3))
            parts["gem"] = h.float().clamp(min=1e-6).pow(3).mean((2, 3)).pow(1 / 3)
            views.append(parts)
        for key in views[0]:
            out.setdefault(key, []).append(torch.stack([p[key] for p in views], 1).numpy())
    np.savez(args.out, names=np.array([p.path.name for p in data.samples]), **{k: np.concatenate(v) for k, v in
                                                                               out.items()})
    print(f"{args.out}: {', '.join(out)} for {len(idx)} images in {time.time() - t0:.0f} s")


@torch.no_grad()
def aug_features(args: argparse.Namespace) -> None:
    """The last map's average pool under ``--views`` random augmentations per image (the fine-tuning recipe's
    BatchAugment: crop scale, flips, rotation, colour, skin tone), seeded, as extra training rows for the probe."""
    from mpoxscope.data.batch_augment import BatchAugment
    from mpoxscope.data.transforms import AugmentConfig

    data = load_samples(msld_root())
    model = create_model(ModelConfig(backbone=args.backbone, image_size=args.image_size, head="linear"),
                         len(data.classes)).eval()
    idx = list(range(len(data.samples)))
    cache = build_image_cache(data, idx, args.image_size, progress_bar=False)
    augment = BatchAugment(args.image_size, AugmentConfig(), model.mean, model.std)
    g, t0, out = torch.Generator().manual_seed(args.seed), time.time(), []
    for s in range(0, len(idx), 16):
        raw = cache.train.index_select(0, cache.index(idx[s:s + 16]))
        views = []
        for _ in range(args.views):
            h = augment(raw, g).contiguous(memory_format=torch.channels_last)
            for stage in model.stages:
                h = stage(h)
            views.append(h.float().mean((2, 3)))
        out.append(torch.stack(views, 1).numpy())
    np.savez(args.out, names=np.array([p.path.name for p in data.samples]), aug=np.concatenate(out))
    print(f"{args.out}: aug ({args.views} views) for {len(idx)} images in {time.time() - t0:.0f} s")


def _load(npz: str, keys: str):
    z = np.load(npz)
    data = load_samples(msld_root())
    if list(z["names"]) != [s.path.name for s in data.samples]:
        sys.exit(f"{npz}: computed for other images than {msld_root()}")
    x = np.concatenate([z[k] for k in keys.split("+")], -1).astype(np.float32)
    folds, _ = resolve_folds(data, msld_root() / "datalog.xlsx")
    return data, x, np.asarray(data.targets), folds


def _write(path: Path, data, idx: list[int], probs: np.ndarray) -> None:
    path.mkdir(parents=True, exist_ok=True)
    classes = list(data.classes)
    lines = ["filename,true,predicted,confidence," + ",".join(classes)]
    for i, p in zip(idx, probs):
        lines.append(f"{data.samples[i].path.name},{classes[data.targets[i]]},{classes[p.argmax()]},{p.max():.4f},"
                     + ",".join(f"{v:.6f}" for v in p))
    (path / "predictions.csv").write_text("\n".join(lines) + "\n")


def fit(args: argparse.Namespace) -> None:
    data, x, y, folds = _load(args.npz, args.keys)
    extra = None
    if args.extra:  # extra training rows only (validation and test are scored on the views of ``keys``)
        path, _, n = args.extra.partition(":")
        extra = np.load(path)["aug"].astype(np.float32)
        extra = extra[:, :int(n)] if n else extra
    pooled = {"validation": ([], []), "evaluation": ([], [])}
    for f in folds:
        tr, va, te = list(f.train), list(f.validation), list(f.test)
        rows = x[tr] if extra is None else np.concatenate([x[tr], extra[tr]], 1)
        probe = fit_logistic(rows, y[tr], x[va], y[va], len(data.classes), grid=C_GRID_WIDE)
        val_logits = (x[va] @ probe.weight.T + probe.bias).mean(1)
        t = fit_temperature(val_logits, y[va])
        if args.refit:  # same C on training + validation; the temperature above (validation is now in-sample)
            both = tr + va
            rows = x[both] if extra is None else np.concatenate([x[both], extra[both]], 1)
            probe = fit_logistic(rows, y[both], x[va], y[va], len(data.classes), grid=(probe.c,))
        for split, idx, logits in (("validation", va, val_logits),
                                   ("evaluation", te, (x[te] @ probe.weight.T + probe.bias).mean(1))):
            p = softmax(logits / t, 1)
            _write(args.out / f.name / split, data, idx, p)
            pooled[split][0].append(y[idx])
            pooled[split][1].append(p)
    (yv, pv), (yt, pt) = ((np.concatenate(a), np.concatenate(b)) for a, b in pooled.values())
    name = f"{args.keys}{' + ' + args.extra if args.extra else ''}{' refit' if args.refit else ''}"
    print(f"{name}: pooled validation macro-F1 "
          f"{100 * f1_score(yv, pv.argmax(1), average='macro'):.2f} | test (reported, not used) accuracy "
          f"{100 * (pt.argmax(1) == yt).mean():.2f}, macro-F1 {100 * f1_score(yt, pt.argmax(1), average='macro'):.2f}"
          f", ECE {expected_calibration_error(pt, yt):.3f}")


def curve(args: argparse.Namespace) -> None:
    data, x, y, folds = _load(args.npz, args.keys)
    groups = np.array(data.groups)
    for frac in args.fractions:
        scores = []
        for draw in range(args.draws if frac < 1 else 1):
            yv, pv = [], []
            for f in folds:
                tr, va = np.array(f.train), list(f.validation)
                if frac < 1:  # whole patients, so no patient is split between kept and dropped
                    keep, _ = next(GroupShuffleSplit(1, train_size=frac, random_state=draw).split(tr,
                                                                                                groups=groups[tr]))
                    tr = tr[keep]
                probe = fit_logistic(x[tr], y[tr], x[va], y[va], len(data.classes))
                pv.append((x[va] @ probe.weight.T + probe.bias).mean(1).argmax(1))
                yv.append(y[va])
            scores.append(100 * f1_score(np.concatenate(yv), np.concatenate(pv), average="macro"))
        print(f"training fraction {frac}: pooled validation macro-F1 {np.mean(scores):.2f} "
              f"({', '.join(f'{s:.2f}' for s in scores)})", flush=True)


def simulate(args: argparse.Namespace) -> None:
    """The refit rehearsed on validation: within each fold's training part, A (the share the real training part
    has of training + validation) plays "training" and B "validation"; the fold's real validation part scores
    (i) the fit on A, (ii) a refit on A + B with the same C, (iii) a refit with C scaled by |A| / |A + B|."""
    data, x, y, folds = _load(args.npz, args.keys)
    groups = np.array(data.groups)
    variants = ("no refit", "refit, same C", "refit, C x |A|/|A+B|")
    for draw in range(args.draws):
        out = {v: ([], []) for v in variants}
        for f in folds:
            tr, va = np.array(f.train), list(f.validation)
            share = len(tr) / (len(tr) + len(va))
            a, b = next(GroupShuffleSplit(1, train_size=share, random_state=draw).split(tr, groups=groups[tr]))
            a, b = list(tr[a]), list(tr[b])
            first = fit_logistic(x[a], y[a], x[b], y[b], len(data.classes))
            t = fit_temperature((x[b] @ first.weight.T + first.bias).mean(1), y[b])
            fits = {variants[0]: first}
            for name, c in ((variants[1], first.c), (variants[2], first.c * len(a) / (len(a) + len(b)))):
                fits[name] = fit_logistic(x[a + b], y[a + b], x[b], y[b], len(data.classes), grid=(c,))
            for name, fit_ in fits.items():
                out[name][0].append(y[va])
                out[name][1].append(softmax((x[va] @ fit_.weight.T + fit_.bias).mean(1) / t, 1))
        if args.beside:  # the ensemble's rule (log of the mean calibrated probability) with another member
            from posthoc_members import member_probs  # beside this script

            other = [member_probs(args.beside, f.name, "validation", [data.samples[i].path.name
                                                                      for i in f.validation])[0] for f in folds]
            for name in variants:
                out[f"{name} + member"] = (out[name][0], [np.clip((p + q) / 2, 1e-6, 1)
                                                         for p, q in zip(out[name][1], other)])
        for name, (ys, ps) in out.items():
            yy, pp = np.concatenate(ys), np.concatenate(ps)
            nll_ = -np.log(np.clip(pp[np.arange(len(yy)), yy], 1e-12, 1)).mean()
            print(f"draw {draw} {name:22s}: pooled validation macro-F1 "
                  f"{100 * f1_score(yy, pp.argmax(1), average='macro'):.2f}, NLL {nll_:.4f}, "
                  f"ECE {expected_calibration_error(pp, yy):.4f}", flush=True)


#: Wider than the package's grid: several stages concatenated have more features to regularise.
C_GRID_WIDE = (0.0003, *C_GRID)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("features")
    p.add_argument("--backbone", default="tf_efficientnet_lite2")
    p.add_argument("--image-size", type=int, default=260)
    p.add_argument("--out", required=True)
    p.set_defaults(run=features)
    p = sub.add_parser("fit")
    p.add_argument("npz")
    p.add_argument("keys", help="feature names joined by +, e.g. gap8+gmp")
    p.add_argument("--refit", action="store_true")
    p.add_argument("--extra", help="NPZ[:N]: the first N views of an augfeatures file as extra training rows")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(run=fit)
    p = sub.add_parser("augfeatures")
    p.add_argument("--backbone", default="tf_efficientnet_lite2")
    p.add_argument("--image-size", type=int, default=260)
    p.add_argument("--views", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(run=aug_features)
    p = sub.add_parser("curve")
    p.add_argument("npz")
    p.add_argument("keys")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.7, 0.85, 1.0])
    p.add_argument("--draws", type=int, default=3)
    p.set_defaults(run=curve)
    p = sub.add_parser("simulate")
    p.add_argument("npz")
    p.add_argument("keys")
    p.add_argument("--draws", type=int, default=3)
    p.add_argument("--beside", type=Path, help="a cv folder of another member's predictions: also score the pair")
    p.set_defaults(run=simulate)
    args = ap.parse_args()
    torch.set_num_threads(2)
    args.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
