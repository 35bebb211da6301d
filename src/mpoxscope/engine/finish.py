"""The end of a training run, on the validation part only: test-time augmentation, calibration, screening.

The selected weights are scored on the validation images through the full model exactly as the Predictor will
run it (fp32, the evaluation transform), once per candidate view set; the chosen views go into ``model.json``
(``"tta"``), then calibration and the screening threshold are fitted to the chosen model's validation outputs.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from safetensors.torch import load_file
from scipy.special import softmax

from mpoxscope.config import TrainConfig
from mpoxscope.data.batch_augment import normalise
from mpoxscope.data.samples import SampleSet
from mpoxscope.data.splits import Fold
from mpoxscope.engine import rundir
from mpoxscope.engine.imagecache import build_image_cache
from mpoxscope.engine.metrics import classification_metrics
from mpoxscope.engine.passes import photos_per_forward, views_per_photo
from mpoxscope.engine.predict import calibrated_softmax
from mpoxscope.models.tta import TTA_SETS, TTAModel, resolve_views

BRIEF_KEYS = ("n_images", "accuracy", "f1_macro", "precision_macro", "recall_macro", "roc_auc_ovr_macro", "loss")


def brief(m: dict) -> dict:
    return {k: m[k] for k in BRIEF_KEYS if k in m}


def protocol(data_info: dict, split: str) -> str:
    return f"{data_info.get('dataset', '?')}, {data_info.get('split_source', '?')}, {data_info.get('fold', '?')}, " \
           f"{split}"


def validation_images(batches, data: SampleSet, fold: Fold, image_size: int, mean, std, workers: int,
                      progress: bool) -> torch.Tensor:
    """Normalised validation images (N, 3, S, S) as the Predictor would see them."""
    if hasattr(batches, "val_images"):
        return normalise(batches.val_images, mean, std)
    cache = build_image_cache(data, fold.validation, image_size, workers=workers, progress_bar=progress)
    return normalise(cache.clean.index_select(0, cache.index(fold.validation)), mean, std)


@torch.no_grad()
def logits_of(model: torch.nn.Module, x: torch.Tensor, device: torch.device, batch_size: int | None = None
              ) -> np.ndarray:
    """Logits (N, K) of ``model`` on ``x`` (N, 3, S, S). By default in forward passes of at most
    ``passes.FORWARD_IMAGES`` images (photos x test-time views), as the Predictor runs them: 32 photos x 8 views
    in one pass held several GB of activations at the peak of a cross-validation, for no gain in speed."""
    if batch_size is None:
        batch_size = photos_per_forward(views_per_photo(SimpleNamespace(model=model)), x.shape[-1])
    model.eval()
    return torch.cat([model(x[s:s + batch_size].to(device)).float().cpu()
                      for s in range(0, len(x), batch_size)]).numpy()


def scored(logits: np.ndarray, targets: np.ndarray, classes: list[str]) -> dict:
    """Classification metrics of ``softmax(logits)`` (N, K) against ``targets`` (N,), with the log-loss."""
    from mpoxscope.engine.calibration import nll

    m = classification_metrics(targets, softmax(logits, axis=1), classes)
    m["loss"] = nll(logits, targets)
    return m


def choose_tta(model: torch.nn.Module, x: torch.Tensor, targets: np.ndarray, classes: list[str], spec: str,
               device: torch.device) -> tuple[str, dict, np.ndarray]:
    """The view set with the lowest validation log-loss among ``TTA_SETS`` when ``spec`` is "auto" (then the
    higher macro-F1; fewer views win ties), else ``spec``; returns (name, scores of every candidate, its
    validation logits). Log-loss, not macro-F1, decides: on a validation part of ~100 images F1 moves in steps of
    one image, while the loss of averaged views is a smooth measure of the same thing."""
    names = list(TTA_SETS) if spec == "auto" else [spec]
    scored_sets, best = {}, None
    for name in names:
        logits = logits_of(TTAModel(model, resolve_views(name)), x, device)
        m = scored(logits, targets, classes)
        scored_sets[name] = {"f1_macro": m["f1_macro"], "accuracy": m["accuracy"], "loss": m["loss"]}
        key = (-round(m["loss"], 6), round(m["f1_macro"], 10))
        if best is None or key > best[0]:
            best = (key, name, logits)
    return best[1], scored_sets, best[2]


def finish_run(run_dir: Path, model, batches, stop: int, data: SampleSet, fold: Fold, cfg: TrainConfig,
               device: torch.device, precision: str, meta: dict, best_epoch: int, progress: bool) -> dict:
    """Load the best weights, then choose TTA views, calibration and the screening threshold on validation."""
    from mpoxscope.engine.calibration import calibrate

    model.load_state_dict(load_file(str(rundir.require_weights(run_dir))))
    model.eval()
    x = validation_images(batches, data, fold, model.config.image_size, model.mean, model.std,
                          cfg.num_workers, progress)
    targets = np.array([data.targets[i] for i in fold.validation])
    name, candidates, logits = choose_tta(model, x, targets, data.classes, cfg.tta, device)
    meta["tta"] = {"set": name, "views": list(resolve_views(name)), "chosen_on": "validation",
                   "candidates": candidates}
    val = scored(logits, targets, data.classes)
    meta["validation"] = {**brief(val), "epoch": best_epoch, "tta": name,
                          "protocol": protocol(meta.get("data", {}), "validation")}
    meta["calibration"] = calibrate(logits, targets)
    probs = calibrated_softmax(torch.as_tensor(logits), meta["calibration"])
    meta["screening"] = screening_block(probs, targets, data.classes, cfg, protocol(meta.get("data", {}), "validation"),
                                        [data.groups[i] for i in fold.validation])
    save_validation_probs(run_dir, [data.samples[i].filename for i in fold.validation], probs, meta)
    return meta


def _outputs_digest(meta: dict) -> str:
    """What a model's probabilities depend on beyond its weights file: views and calibration."""
    import hashlib
    import json

    blob = json.dumps({k: meta.get(k) for k in ("tta", "calibration", "members")}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def save_validation_probs(run_dir: Path, names: list[str], probs: np.ndarray, meta: dict) -> None:
    """Keep the calibrated validation probabilities (N, K) computed here: the fp32 model, its views and the same
    decoded pixels as the Predictor (max |dp| 2e-6 on MSLD fold 1), so ``cv`` need not score them again."""
    from mpoxscope.fileio import atomic_path

    with atomic_path(Path(run_dir) / rundir.VALIDATION_PROBS) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, names=np.asarray(names, dtype=str), probs=np.asarray(probs, dtype=np.float64),
                 digest=np.asarray(_outputs_digest(meta)))


def load_validation_probs(run_dir: Path, names: list[str], meta: dict) -> np.ndarray | None:
    """The saved validation probabilities when they belong to ``names`` (in order) and to this model.json's views
    and calibration; else None (an older run, or a run recalibrated since)."""
    try:
        with np.load(Path(run_dir) / rundir.VALIDATION_PROBS, allow_pickle=False) as z:
            if list(z["names"]) != list(names) or str(z["digest"]) != _outputs_digest(meta):
                return None
            return z["probs"]
    except (OSError, KeyError, ValueError):
        return None


def screening_block(probs: np.ndarray, targets: np.ndarray, classes: list[str], cfg: TrainConfig,
                    source: str, groups: list[str] | None = None) -> dict | None:
    """The sensitivity-first threshold for ``cfg.screen_class``; None when that class is not in the data or
    has no validation cases (the run then has no screening rule)."""
    from mpoxscope.engine.screening import fit_screening, resolve_target_class
    from mpoxscope.errors import MpoxscopeError

    try:
        idx = resolve_target_class(cfg.screen_class, classes)
    except MpoxscopeError:
        return None
    if not (targets == idx).any():
        return None
    return fit_screening(probs, targets, classes, cfg.screen_class, cfg.screen_sensitivity, source,
                         cfg.screen_confidence, groups)
