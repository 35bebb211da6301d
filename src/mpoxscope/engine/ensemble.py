"""Ensembles as a first-class run: ``RUN/members/<name>/`` are ordinary runs (one per backbone and seed, the
same recipe otherwise, or a named preset's recipe with ``BACKBONE@PRESET``); ``RUN/model.json``
(``kind: ensemble``) lists them, and its validation metrics, calibration and screening threshold are those of
the averaged model, fitted on the validation part only.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from mpoxscope.config import PRESETS, ModelConfig, TrainConfig, preset, to_dict
from mpoxscope.data.batch_augment import normalise
from mpoxscope.data.samples import SampleSet
from mpoxscope.data.splits import Fold
from mpoxscope.engine import distributed, rundir
from mpoxscope.engine.checkpoint import load_inference_model, read_meta, write_meta
from mpoxscope.engine.device import resolve_device
from mpoxscope.engine.features import FeatureBank
from mpoxscope.engine.finish import brief, logits_of, protocol, save_validation_probs, scored, screening_block
from mpoxscope.engine.imagecache import ImageCache, build_image_cache
from mpoxscope.engine.predict import calibrated_softmax
from mpoxscope.engine.train import TrainResult, train
from mpoxscope.errors import MpoxscopeError
from mpoxscope.fileio import write_json

#: Fields a member always takes from the ensemble's own configuration, whatever its recipe: where and how it
#: runs, and what the averaged model is asked to do.
_SHARED_TRAIN_FIELDS = ("device", "precision", "num_workers", "screen_class", "screen_sensitivity",
                        "screen_confidence")


def parse_member(spec: str, default_seed: int) -> tuple[str, int, str | None]:
    """``"tf_efficientnet_lite1:3"`` -> (backbone, seed, None); ``"tf_efficientnet_lite2@frozen"`` -> (backbone,
    default seed, "frozen"): that member follows the ``frozen`` preset's recipe instead of the shared one."""
    body, _, recipe = spec.partition("@")
    backbone, _, seed = body.partition(":")
    if not backbone:
        raise MpoxscopeError(f"--ensemble: empty backbone in {spec!r}")
    if "@" in spec and recipe not in PRESETS:
        raise MpoxscopeError(f"--ensemble: unknown recipe {recipe!r} in {spec!r}; choose one of {', '.join(PRESETS)}")
    try:
        return backbone, int(seed) if seed else default_seed, recipe or None
    except ValueError:
        raise MpoxscopeError(f"--ensemble: seed of {spec!r} is not an integer") from None


def member_configs(specs: tuple[str, ...], model_cfg: ModelConfig, train_cfg: TrainConfig,
                   ) -> list[tuple[str, ModelConfig, TrainConfig]]:
    """(member folder name, model config, train config) per spec: the shared recipe with its backbone/seed, or
    the named preset's recipe (``@PRESET``) at the ensemble's image size, precision and device. One image size
    for all members, so the ensemble reads one preprocessed input."""
    out, seen = [], set()
    for spec in specs:
        backbone, seed, recipe = parse_member(spec, train_cfg.seed)
        name = f"{backbone}-seed{seed}" + (f"-{recipe}" if recipe else "")
        if name in seen:
            raise MpoxscopeError(f"--ensemble: member {spec!r} given twice")
        seen.add(name)
        mc, tc = preset(recipe) if recipe else (model_cfg, train_cfg)
        shared = {f: getattr(train_cfg, f) for f in _SHARED_TRAIN_FIELDS}
        out.append((name, dataclasses.replace(mc, backbone=backbone, image_size=model_cfg.image_size),
                    dataclasses.replace(tc, seed=seed, ensemble=(), **shared)))
    return out


def train_ensemble(data: SampleSet, fold: Fold, model_cfg: ModelConfig, train_cfg: TrainConfig,
                   specs: tuple[str, ...], run_dir: str | Path, data_info: dict | None = None,
                   images: ImageCache | None = None, progress: bool = True, log=print,
                   banks: dict[str, FeatureBank] | None = None) -> TrainResult:
    """Train every member (each resumable on its own), then fit the ensemble's calibration and screening
    threshold on the validation part and write ``RUN/model.json``. ``banks``: trunk outputs of frozen-trunk
    members by member name, shared across the folds of a cross-validation."""
    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    members = member_configs(specs, model_cfg, train_cfg)
    data_info = {**(data_info or {}), "fold": fold.name}
    if images is None:
        images = build_image_cache(data, sorted(set(fold.train) | set(fold.validation)), model_cfg.image_size,
                                   workers=train_cfg.num_workers, progress_bar=progress)
    results = []
    for name, mc, tc in members:
        log(f"{fold.name}: ensemble member {name}")
        results.append(train(data, fold, mc, tc, run_dir / rundir.MEMBERS / name, data_info, images=images,
                             bank=(banks or {}).get(name), progress=progress, log=log))
    if distributed.is_main():  # under torchrun, rank 0 alone writes
        combine(run_dir, [n for n, _, _ in members], data, fold, images, train_cfg, data_info, specs)
    distributed.barrier()
    meta = read_meta(run_dir)
    return TrainResult(run_dir, 0, max(r.epochs_run for r in results), meta["validation"],
                       time.perf_counter() - t0, results[0].skipped_files, all(r.resumed for r in results))


def combine(run_dir: Path, names: list[str], data: SampleSet, fold: Fold, images: ImageCache,
            train_cfg: TrainConfig, data_info: dict, specs: tuple[str, ...]) -> dict:
    """Write the ensemble's ``model.json`` from trained members (no test data involved)."""
    from mpoxscope.engine.calibration import ENSEMBLE_METHODS, calibrate

    first = read_meta(run_dir / rundir.MEMBERS / names[0])
    meta = {k: first[k] for k in ("format_version", "mpoxscope_version", "classes", "image_size", "normalization")}
    meta.update(kind="ensemble", model={**first["model"], "backbone": "+".join(names)},
                members=[{"dir": f"{rundir.MEMBERS}/{n}"} for n in names], data=data_info,
                train={**to_dict(train_cfg), "ensemble": list(specs)}, pretrained_source=first.get("pretrained_source"))
    write_meta(run_dir, meta)  # members are readable from here on; calibration follows
    device = resolve_device(train_cfg.device)
    model, _ = load_inference_model(run_dir, device=device)
    norm = meta["normalization"]
    x = normalise(images.clean.index_select(0, images.index(fold.validation)), norm["mean"], norm["std"])
    targets = np.array([data.targets[i] for i in fold.validation])
    logits = logits_of(model, x, device)
    val = scored(logits, targets, data.classes)
    member_val = {n: read_meta(run_dir / rundir.MEMBERS / n).get("validation", {}) for n in names}
    meta["validation"] = {**brief(val), "protocol": protocol(data_info, "validation"),
                          "members": {n: brief(v) for n, v in member_val.items()}}
    # Always the ensemble's temperature: chosen on validation (benchmarks/results/calibration.md)
    meta["calibration"] = calibrate(logits, targets, methods=ENSEMBLE_METHODS)
    probs = calibrated_softmax(torch.as_tensor(logits), meta["calibration"])
    meta["screening"] = screening_block(probs, targets, data.classes, train_cfg, protocol(data_info, "validation"),
                                        [data.groups[i] for i in fold.validation])
    save_validation_probs(run_dir, [data.samples[i].filename for i in fold.validation], probs, meta)
    write_meta(run_dir, meta)
    write_json(run_dir / rundir.STATE, {"status": "finished", "members": names})
    return meta
