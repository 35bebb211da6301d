"""Refit a trained (AdamW) run on its training and validation parts together (``--refit-trained``).

Once validation has chosen everything it chooses — the epoch to keep, the test-time views, the temperature, the
abstain and screening thresholds (and, in an ensemble, the ensemble's own temperature and threshold) — the network
is trained again from the same start on training + validation, with the same recipe and schedule, and stopped
after the epoch that validation chose; its weights replace the selected ones, every choice stays. The linear
probe's refit (``engine.probe.refit_probe``) is the same idea for a model without epochs. The training part is
only ~78 % of what an official MSLD fold may learn from, and the validation learning curves (recipe_search.md #41,
#46) still rise at 100 %.

The refit is its own resumable run in ``RUN/refit/`` (``resume.pt`` after every epoch, as training), so a kill
loses at most one epoch and a resumed refit ends with the weights an uninterrupted one reaches; once the weights
are installed, ``model.json`` holds a ``refit`` block and a rerun does nothing.
"""

from __future__ import annotations

import time
from pathlib import Path

from mpoxscope.config import ModelConfig, TrainConfig
from mpoxscope.data.samples import SampleSet
from mpoxscope.data.splits import Fold
from mpoxscope.engine import distributed, rundir
from mpoxscope.engine.checkpoint import read_meta, write_meta
from mpoxscope.engine.device import resolve_device, resolve_precision
from mpoxscope.engine.features import FeatureBank
from mpoxscope.engine.imagecache import ImageCache
from mpoxscope.errors import MpoxscopeError
from mpoxscope.fileio import read_json

#: The refit's own run folder inside the run it refits.
REFIT_DIR = "refit"


def check_refit_trained(train_cfg: TrainConfig) -> None:
    """``refit_trained`` is an extension of ``refit`` and runs in one process."""
    if train_cfg.refit_trained and not train_cfg.refit:
        raise MpoxscopeError("--refit-trained needs --refit (it refits the trained runs too); drop --no-refit")
    if train_cfg.refit_trained and distributed.context().active:
        raise MpoxscopeError("--refit-trained runs in one process (the default preset refits): start it without "
                             "torchrun, or pass --no-refit")


def refit_trained(run_dir: str | Path, data: SampleSet, fold: Fold, model_cfg: ModelConfig, train_cfg: TrainConfig,
                  images: ImageCache | None = None, bank: FeatureBank | None = None, progress: bool = False,
                  log=print) -> dict:
    """Retrain the finished AdamW run in ``run_dir`` on ``fold.train`` + ``fold.validation`` for the epoch count
    it chose on validation and install the weights; returns the ``refit`` block written into ``model.json``.

    ``model_cfg``/``train_cfg``: the run's own configuration (as it was trained). ``images``/``bank``: the decoded
    images or trunk outputs the training used, shared instead of rebuilt when they cover both parts.
    """
    from mpoxscope.engine.train import _one_refit_epoch, _Setup, _start_or_resume, seed_everything

    run_dir = Path(run_dir)
    meta = read_meta(run_dir)
    if meta.get("refit"):
        return meta["refit"]
    state = read_json(run_dir / rundir.STATE)
    if state.get("status") != "finished":
        raise MpoxscopeError(f"{run_dir}: not a finished training run; nothing to refit")
    epochs = int(state["best_epoch"])
    t0 = time.perf_counter()
    both = Fold(fold.name, tuple(sorted({*fold.train, *fold.validation})), (), fold.test)
    seed_everything(train_cfg.seed)
    device = resolve_device(train_cfg.device)
    # the precision the chosen epochs were trained in, also where this machine's own choice differs
    precision = resolve_precision(device, train_cfg.precision,
                                  (meta.get("trainable_stages_resolved") or {}).get("precision"))
    sub = run_dir / REFIT_DIR
    r = _Setup.build(sub, data, both, model_cfg, train_cfg, {**meta.get("data", {}), "parts": "train+validation"},
                     bank, images, device, precision, progress, distributed.Context())
    done = _start_or_resume(sub, r.model, r.optimizer, r.scheduler, r.meta, True, log, r.ctx, r.ema)
    for epoch in range(done.epoch + 1, epochs + 1):
        _one_refit_epoch(r, done, epoch, sub, train_cfg, log if progress else None)
    rundir.save_weights(r.evaluated, run_dir / rundir.BEST)
    seconds = round(time.perf_counter() - t0, 1)  # this process's share when the refit was resumed
    meta["refit"] = {"parts": ["train", "validation"], "images": len(both.train), "epochs": epochs,
                     "of_epochs": train_cfg.epochs, "seconds": seconds,
                     "note": "retrained from the same start on the training and validation parts for the epoch "
                             "count chosen on validation; views, calibration, thresholds and the validation scores "
                             "are from before the refit"}
    write_meta(run_dir, meta)
    log(f"{run_dir}: retrained on training + validation ({len(both.train)} images, {epochs} of "
        f"{train_cfg.epochs} epochs, {seconds:.0f} s)")
    return meta["refit"]
