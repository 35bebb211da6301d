"""Linear probe: a frozen ImageNet trunk read by a linear head fitted by logistic regression (scikit-learn).

``TrainConfig(solver="logistic")`` with the linear head: instead of epochs of AdamW on cached augmented views,
the trunk's globally pooled features of every training image under the eight symmetries of the square (the ``d4``
test-time views) are standardised and fitted by ``sklearn.linear_model.LogisticRegression`` (class-balanced, L2),
its ``C`` chosen by validation log-loss of the view-averaged logits (what ``TTAModel`` computes); the scaler is
folded into the head's ``nn.Linear``, so the run is an ordinary linear-head run that every consumer (evaluate,
predict, serve, ONNX, explain, ensembles) reads unchanged. The finish (test-time views, calibration, screening) is
the shared one. On MSLD's official folds a probe on Lite2 at 260 px scored pooled validation macro-F1 76.4 %
against 72.4 % for an AGFN head trained on the same frozen trunk (benchmarks/results/recipe_search.md #34).

``TrainConfig(refit=True)`` (``--refit``) then refits the head on the training and validation parts together, with
the ``C`` chosen on validation and every other choice kept (views, calibration, screening threshold), as
scikit-learn's ``GridSearchCV(refit=True)`` does: the validation numbers recorded in the run are those of the model
before the refit (afterwards the validation part is training data). On MSLD the probe's pooled validation macro-F1
still rose by 2 points from 85 % to 100 % of the training part (recipe_search.md #41), which is why the refit's
27 % more images are worth using.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> x = rng.normal(size=(40, 2, 3)).astype("float32"); y = (x[:, :, 0].mean(1) > 0).astype(int)
>>> fit = fit_logistic(x, y, x, y, n_classes=2, grid=(1.0,))
>>> fit.weight.shape, fit.bias.shape, fit.c
((2, 3), (2,), 1.0)
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from mpoxscope.config import ModelConfig, TrainConfig, to_dict
from mpoxscope.data.batch_augment import normalise
from mpoxscope.data.samples import SampleSet
from mpoxscope.data.splits import Fold
from mpoxscope.engine import rundir
from mpoxscope.engine.checkpoint import build_meta, load_model, read_meta, save_weights, write_meta
from mpoxscope.engine.device import resolve_device
from mpoxscope.engine.finish import finish_run
from mpoxscope.engine.imagecache import ImageCache, build_image_cache
from mpoxscope.engine.train import TrainResult
from mpoxscope.errors import MpoxscopeError
from mpoxscope.fileio import write_json
from mpoxscope.models.factory import SkinLesionNet, create_model
from mpoxscope.models.tta import TTA_SETS, VIEWS

#: Inverse L2 strengths tried, strongest first (on MSLD the choice was 0.003-0.03 on every fold).
C_GRID = (0.001, 0.003, 0.01, 0.03, 0.1)
#: The views every training image is seen in (and the view-averaged logits that choose ``C``).
PROBE_VIEWS = TTA_SETS["d4"]

# Pooled features already computed in this process, per trunk and image file (path, size, modification time):
# a cross-validation's folds share them; a changed file is computed again.
_FEATURES: dict[tuple, dict[tuple, torch.Tensor]] = {}


@dataclass
class LogisticFit:
    """A fitted probe in the units of the raw pooled features: logits = features @ weight.T + bias."""

    weight: np.ndarray  # (K, C)
    bias: np.ndarray  # (K,)
    c: float
    losses: dict[str, float]  # validation log-loss per C tried


def check_probe(model_cfg: ModelConfig, train_cfg: TrainConfig) -> None:
    """Refuse a logistic solver for anything but a frozen trunk read by the linear head, and ``--refit`` where no
    probe is trained, in one line."""
    if train_cfg.solver not in ("adamw", "logistic"):
        raise MpoxscopeError(f"--solver: choose adamw or logistic, got {train_cfg.solver!r}")
    if train_cfg.solver == "logistic" and (model_cfg.head != "linear" or train_cfg.trainable_stages != 0):
        raise MpoxscopeError("--solver logistic fits a linear head on a frozen trunk: use --head linear and "
                             "--finetune 0 (the probe preset)")
    from mpoxscope.engine.refit import check_refit_trained

    check_refit_trained(train_cfg)
    if train_cfg.refit and not refits_something(model_cfg, train_cfg):
        raise MpoxscopeError("--refit refits linear probes (--solver logistic, or an ensemble's @probe members); "
                             "this configuration refits none (--refit-trained retrains the others too, unless a "
                             "member says refit=no)")


def refits_something(model_cfg: ModelConfig, train_cfg: TrainConfig) -> bool:
    """Whether the run is a probe that ``--refit`` can refit, or any run at all with ``refit_trained``; for an
    ensemble, whether ``--refit`` refits one of its members (:func:`~mpoxscope.engine.ensemble.refit_members`)."""
    if not train_cfg.ensemble:
        if train_cfg.refit_trained:
            return True
        return train_cfg.solver == "logistic"
    from mpoxscope.engine.ensemble import refit_members

    return bool(refit_members(train_cfg.ensemble, model_cfg, train_cfg))


def fit_logistic(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
                 n_classes: int, grid: tuple[float, ...] = C_GRID, class_balanced: bool = True,
                 n_jobs: int | None = None) -> LogisticFit:
    """Logistic regression on ``train_x`` (N, V, C) — every view a training row — with ``C`` chosen by the log-loss
    of ``val_x`` (M, V, C)'s view-averaged logits; the standardisation is folded into the returned weights.

    Every fit runs with single-threaded BLAS and the ``C`` values in ``n_jobs`` threads (default: one per ``C``, up
    to the CPU count). BLAS's own threads cost more than they give on these thin products (the default's grid on a
    2-core CPU: 4.5 s with them, 1.7 s without when quiet, 47 s against 1.9 s beside another job), and without them
    the fit no longer depends on how many threads the machine has (the same weights for every ``n_jobs``)."""
    from joblib import Parallel, delayed
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    from mpoxscope.engine.calibration import nll

    rows, labels = train_x.reshape(-1, train_x.shape[-1]), np.repeat(train_y, train_x.shape[1])
    scaler = StandardScaler().fit(rows)
    scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
    z = scaler.transform(rows)

    weights = "balanced" if class_balanced else None

    def fit_one(c: float) -> LogisticRegression:
        return LogisticRegression(C=c, max_iter=5000, class_weight=weights).fit(z, labels)

    jobs = n_jobs or max(1, min(len(grid), os.cpu_count() or 1))
    with threadpool_limits(1, user_api="blas"):  # process-wide, so around the pool, not inside each thread
        fitted = Parallel(n_jobs=jobs, prefer="threads")(delayed(fit_one)(c) for c in grid)
    best, losses = None, {}
    for c, clf in zip(grid, fitted, strict=True):  # in grid order: ties go to the stronger regularisation
        if len(clf.classes_) != n_classes:
            raise MpoxscopeError(f"training part holds {len(clf.classes_)} of {n_classes} classes: cannot fit a probe")
        coef, intercept = clf.coef_, clf.intercept_
        if n_classes == 2:  # one logit z for class 1: softmax([-z/2, z/2]) = sigmoid(z), the same probabilities
            coef, intercept = np.vstack([-coef / 2, coef / 2]), np.concatenate([-intercept / 2, intercept / 2])
        weight = coef / scale
        bias = intercept - weight @ scaler.mean_
        loss = nll((val_x @ weight.T + bias).mean(1), val_y)
        losses[str(c)] = round(float(loss), 6)
        if best is None or loss < best.losses[str(best.c)]:
            best = LogisticFit(weight.astype(np.float32), bias.astype(np.float32), c, losses)
    return best


def _file_key(path: Path) -> tuple:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


@torch.no_grad()
def pooled_features(model: SkinLesionNet, data: SampleSet, images: ImageCache, indices: list[int],
                    device: torch.device, batch_size: int = 16) -> torch.Tensor:
    """(N, V, C) globally pooled trunk features of the clean images ``indices`` (decoded in ``images``) under
    ``PROBE_VIEWS``, fp32; computed once per trunk and image file in this process."""
    done = _FEATURES.setdefault((model.config.backbone, model.config.image_size, str(model.config.pretrained)), {})
    keys = [_file_key(data.samples[i].path) for i in indices]
    missing = [(i, k) for i, k in zip(indices, keys) if k not in done]
    model.eval()
    for s in range(0, len(missing), batch_size):
        part = missing[s:s + batch_size]
        x = normalise(images.clean.index_select(0, images.index([i for i, _ in part])), model.mean, model.std)
        x = x.to(device)
        feats = torch.stack([model.forward_features(VIEWS[v](x), 0).float().mean((2, 3)) for v in PROBE_VIEWS], 1)
        done.update(zip((k for _, k in part), feats.cpu()))
    return torch.stack([done[k] for k in keys])


def _images_for(data: SampleSet, fold: Fold, size: int, images: ImageCache | None, workers: int,
                progress: bool) -> ImageCache:
    needed = [*fold.train, *fold.validation]
    if images is None or images.clean.shape[-1] != size or not images.covers(needed):
        images = build_image_cache(data, needed, size, workers=workers, progress_bar=progress)
    return images


def _set_head(model: SkinLesionNet, fit: LogisticFit) -> None:
    head = model.head.classifier
    head.weight.data.copy_(torch.from_numpy(fit.weight))
    head.bias.data.copy_(torch.from_numpy(fit.bias))


def refit_probe(run_dir: Path, data: SampleSet, fold: Fold, images: ImageCache | None = None,
                device: torch.device | str = "cpu", model: SkinLesionNet | None = None, workers: int = 2,
                progress: bool = False, log=print) -> dict:
    """Refit a fitted probe run's head on ``fold.train`` and ``fold.validation`` together with the ``C`` it chose
    on validation; its views, calibration and screening threshold (fitted before, on validation) are kept. Writes
    the weights and a ``refit`` block into ``model.json`` and returns that block. Deterministic: a run refit
    twice holds the same weights."""
    run_dir = Path(run_dir)
    meta = read_meta(run_dir)
    if model is None:
        model, _ = load_model(run_dir, device=device)
    device = next(model.parameters()).device
    rows = [*fold.train, *fold.validation]
    images = _images_for(data, fold, model.config.image_size, images, workers, progress)
    feats = pooled_features(model, data, images, rows, device).numpy()
    targets = np.asarray(data.targets)[rows]
    c = float(meta["probe"]["C"])
    fit = fit_logistic(feats, targets, feats, targets, len(data.classes), grid=(c,),
                       class_balanced=bool(meta.get("train", {}).get("class_balanced", True)))
    _set_head(model, fit)
    save_weights(model, run_dir / rundir.BEST)
    meta["refit"] = {"parts": ["train", "validation"], "images": len(rows), "C": c,
                     "note": "weights refit on the training and validation parts with the C chosen on validation; "
                             "views, calibration, thresholds and the validation scores are from before the refit"}
    write_meta(run_dir, meta)
    log(f"{run_dir}: probe refit on training + validation ({len(rows)} images, C = {c})")
    return meta["refit"]


def fit_probe(data: SampleSet, fold: Fold, model_cfg: ModelConfig, train_cfg: TrainConfig, run_dir: Path,
              data_info: dict, images: ImageCache | None, progress: bool, log,
              skipped: list[str] | None = None) -> TrainResult:
    """Fit the probe of one fold and write its run (weights, ``model.json``, finish), refit on training +
    validation afterwards when ``train_cfg.refit``; reported as ``train`` reports a run, with the fit as its one
    "epoch"."""
    t0 = time.perf_counter()
    device = resolve_device(train_cfg.device)
    model = create_model(model_cfg, len(data.classes)).to(device)
    needed = [*fold.train, *fold.validation]
    images = _images_for(data, fold, model_cfg.image_size, images, train_cfg.num_workers, progress)
    feats = pooled_features(model, data, images, needed, device).numpy()
    targets = np.asarray(data.targets)
    n = len(fold.train)
    fit = fit_logistic(feats[:n], targets[list(fold.train)], feats[n:], targets[list(fold.validation)],
                       len(data.classes), class_balanced=train_cfg.class_balanced)
    _set_head(model, fit)
    meta = build_meta(model, data.classes, train=to_dict(train_cfg), data=data_info,
                      trainable_stages_resolved={"frozen_stages": len(model.stages),
                                                 "total_stages": len(model.stages), "cached": False,
                                                 "precision": "fp32", "processes": 1},
                      probe={"solver": "sklearn LogisticRegression (lbfgs, L2)", "C": fit.c,
                             "validation_log_loss_by_C": fit.losses, "training_views": list(PROBE_VIEWS)})
    rundir.start(run_dir, meta)
    save_weights(model, run_dir / rundir.BEST)
    log(f"{run_dir}: probe fitted (C = {fit.c}, validation log-loss {fit.losses[str(fit.c)]:.3f})")
    val_images = SimpleNamespace(val_images=images.clean.index_select(0, images.index(fold.validation)))
    meta["skipped_files"] = list(skipped or [])
    meta = finish_run(run_dir, model, val_images, len(model.stages), data, fold, train_cfg, device, "fp32", meta, 1,
                      progress)
    write_meta(run_dir, meta)
    if train_cfg.refit:  # after every choice made on validation
        refit_probe(run_dir, data, fold, images, device, model, progress=progress, log=log)
        meta = read_meta(run_dir)
    seconds = round(time.perf_counter() - t0, 1)
    write_json(run_dir / rundir.STATE, {"status": "finished", "epochs_run": 1, "best_epoch": 1,
                                        "wall_time_s": seconds, "skipped_files": list(skipped or [])})
    return TrainResult(run_dir, 1, 1, meta["validation"], seconds, list(skipped or []), False)
