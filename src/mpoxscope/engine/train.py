"""Training: end to end (or the last K stages) on images decoded once into memory, or on cached outputs of a
frozen trunk.

Every path shares the optimiser (AdamW, cosine schedule with warm-up), the loss (label smoothing, class-balanced
weights), gradient clipping, checkpoint selection on validation macro-F1 with early stopping, and the finish:
test-time augmentation, calibration and the screening threshold chosen on validation. Resumable and exact: after
every epoch one file (``resume.pt``: weights, optimiser, scheduler, RNG state, history) is replaced atomically,
and a rerun continues from it to the same result an uninterrupted run reaches.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.utils.class_weight import compute_class_weight
from torch import nn

from mpoxscope.config import ModelConfig, TrainConfig, to_dict
from mpoxscope.data.images import check_images
from mpoxscope.data.samples import SampleSet
from mpoxscope.data.splits import Fold
from mpoxscope.engine import distributed, rundir
from mpoxscope.engine.batches import FeatureBatches, ImageBatches, forward_from
from mpoxscope.engine.checkpoint import build_meta, read_meta, save_weights, write_meta
from mpoxscope.engine.device import autocast, resolve_device, resolve_precision
from mpoxscope.engine.features import FeatureBank, cached_feature_bank
from mpoxscope.engine.finish import finish_run
from mpoxscope.engine.imagecache import ImageCache, build_image_cache
from mpoxscope.engine.metrics import classification_metrics
from mpoxscope.engine.mixing import BatchMixer, weight_average
from mpoxscope.errors import MpoxscopeError
from mpoxscope.fileio import read_json, write_json
from mpoxscope.models.factory import SkinLesionNet, create_model

STATE_FILE = rundir.STATE


@dataclass
class TrainResult:
    run_dir: Path
    best_epoch: int
    epochs_run: int
    validation: dict
    wall_time_s: float
    skipped_files: list[str] = field(default_factory=list)
    resumed: bool = False


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def drop_unreadable(data: SampleSet, fold: Fold, skip: bool) -> tuple[Fold, list[str]]:
    """Decode every image the fold uses before any training starts; stop with one line naming the first bad
    file, or (``skip``) drop the bad ones and return their descriptions."""
    used = sorted(set(fold.train) | set(fold.validation) | set(fold.test))
    errors = check_images([data.samples[i].path for i in used])
    if not errors:
        return fold, []
    if not skip:
        more = f" (and {len(errors) - 1} more unreadable file(s))" if len(errors) > 1 else ""
        raise MpoxscopeError(f"{errors[0]}{more}; fix or remove them, or pass --skip-bad-images")
    bad = {e.path for e in errors}
    keep_set = {i for i in range(len(data)) if str(data.samples[i].path) not in bad}
    clean = Fold(fold.name, *(tuple(i for i in part if i in keep_set)
                              for part in (fold.train, fold.validation, fold.test)))
    return clean, [str(e) for e in errors]


def class_weights(targets: np.ndarray, num_classes: int) -> torch.Tensor:
    """'Balanced' weights n / (K * n_c); classes absent from training get weight 1."""
    present = np.unique(targets)
    w = np.ones(num_classes, dtype=np.float32)
    w[present] = compute_class_weight("balanced", classes=present, y=targets)
    return torch.tensor(w)


def cosine_with_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                       floor: float = 0.01) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def param_groups(model: SkinLesionNet, stop: int, cfg: TrainConfig) -> list[dict]:
    """Head at ``lr``; trainable backbone stages at ``backbone_lr``, decayed by ``layer_decay`` per stage from
    the last one down (layer-wise learning-rate decay); frozen stages get no gradients."""
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    groups = [{"params": list(model.head.parameters()), "lr": cfg.lr}]
    trainable = model.stages[stop:]
    for depth, stage in enumerate(reversed(trainable)):
        params = list(stage.parameters())
        for p in params:
            p.requires_grad_(True)
        if params:
            groups.append({"params": params, "lr": cfg.backbone_lr * cfg.layer_decay ** depth})
    return groups


def _make_batches(model: SkinLesionNet, stop: int, cfg: TrainConfig, data: SampleSet, fold: Fold,
                  bank: FeatureBank | None, images: ImageCache | None, device: torch.device,
                  progress: bool, cache_file: Path | None = None,
                  ctx: distributed.Context = distributed.Context()) -> tuple[FeatureBatches | ImageBatches,
                                                                            FeatureBank | None]:
    """The cache decision, shared by ``train`` and ``cv``: trunk outputs when part of the backbone is frozen and
    ``cache_views`` > 0, else images decoded once (augmented as tensors every epoch)."""
    needed = sorted(set(fold.train) | set(fold.validation))
    if stop > 0 and cfg.cache_views > 0:
        if bank is None or not bank.covers(needed) or bank.key.stop != stop:
            bank = cached_feature_bank(cache_file if ctx.is_main else None, model, stop, data, needed,
                                       cfg.cache_views, cfg.seed, cfg.augment, device, progress=progress,
                                       num_workers=cfg.num_workers)
        return FeatureBatches(bank, stop, data, fold, cfg, ctx.rank, ctx.world_size), bank
    if images is None or not images.covers(needed) or images.clean.shape[-1] != model.config.image_size:
        images = build_image_cache(data, needed, model.config.image_size, workers=cfg.num_workers,
                                   progress_bar=progress)
    return ImageBatches(images, model, data, fold, cfg, device, ctx.rank, ctx.world_size), None


class TrainStep(nn.Module):
    """``forward_from`` as a module, so DistributedDataParallel can wrap the training forward pass."""

    def __init__(self, model: SkinLesionNet, start: int, stop: int) -> None:
        super().__init__()
        self.model, self.start, self.stop = model, start, stop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return forward_from(self.model, x, self.start, self.stop)


def _train_step(model: SkinLesionNet, start: int, stop: int, device: torch.device,
                ctx: distributed.Context) -> nn.Module:
    step = TrainStep(model, start, stop)
    if not ctx.active:
        return step
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(step, device_ids=[device.index] if device.type == "cuda" else None)


def freeze_batchnorm_statistics(stages) -> int:
    """Put the BatchNorm layers of ``stages`` in inference mode for this epoch: they normalise with, and no longer
    update, their pretrained running statistics; their scale and shift still learn. Why: batch statistics of a
    few dozen augmented skin photos are noisy and drift towards the training augmentation, while the test
    images are clean (Keras's guide to fine-tuning EfficientNet keeps BatchNorm layers frozen for small data).
    Returns how many layers it froze."""
    layers = [m for stage in stages for m in stage.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for layer in layers:
        layer.eval()
    return len(layers)


def _train_epoch(model: SkinLesionNet, step: nn.Module, batches, stop: int, optimizer, scheduler,
                 criterion: nn.Module, cfg: TrainConfig, device: torch.device, precision: str,
                 epoch: int = 0, ema=None) -> dict:
    """One pass over the training part; ``ema`` (timm ModelEmaV3) is updated after every optimiser step.
    Training accuracy counts mixed batches against their first labels."""
    model.train()
    for stage in model.stages[:stop]:
        stage.eval()  # frozen stages keep their BatchNorm statistics
    if cfg.freeze_bn_stats:
        freeze_batchnorm_statistics(model.stages[stop:])
    mixer = BatchMixer.from_config(cfg)
    rng = BatchMixer.generator(cfg.seed, epoch, distributed.context().rank) if mixer else None
    total, correct, loss_sum = 0, 0, 0.0
    for x, y in batches.train_epoch():
        x, y = x.to(device), y.to(device)
        mixed = mixer(x, y, rng) if mixer else None
        with autocast(device, precision):
            logits = step(mixed.x if mixed else x)
            loss = mixed.loss(criterion, logits.float()) if mixed else criterion(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update(model, step=scheduler.last_epoch)
        loss_sum += float(loss.detach()) * len(y)
        total += len(y)
        correct += int((logits.argmax(1) == y).sum())
    loss_sum, total, correct = distributed.sum_over_ranks(loss_sum, total, correct)
    return {"train_loss": loss_sum / max(1, total), "train_accuracy": correct / max(1, total)}


@torch.no_grad()
def validate(model: SkinLesionNet, batches, stop: int, classes: list[str], device: torch.device,
             precision: str) -> tuple[dict, np.ndarray, np.ndarray]:
    """Metrics, logits (N, K) and targets (N,) of the validation part."""
    model.eval()
    logits, targets = [], []
    for x, y in batches.validation():
        with autocast(device, precision):
            out = forward_from(model, x.to(device), batches.start, stop)
        logits.append(out.float().cpu())
        targets.append(y)
    ctx = distributed.context()
    logits_t = distributed.gather_rows(torch.cat(logits), ctx)
    targets_t = distributed.gather_rows(torch.cat(targets), ctx)
    metrics = classification_metrics(targets_t.numpy(), torch.softmax(logits_t, 1).numpy(), classes)
    metrics["loss"] = float(nn.functional.cross_entropy(logits_t, targets_t))
    return metrics, logits_t.numpy(), targets_t.numpy()


def stored_settings_match(meta: dict, now: dict, keys: tuple[str, ...] = ("model", "train")) -> bool:
    """Whether a run's ``model.json`` (``meta``) holds the ``keys`` settings of ``now`` (dicts of ``to_dict`` of
    the configs), by :func:`same_settings` — the one rule every reuse of a run follows."""
    now = json.loads(json.dumps({k: now.get(k) for k in keys}))  # tuples read back as lists
    defaults = json.loads(json.dumps({"model": to_dict(ModelConfig()), "train": to_dict(TrainConfig())}))
    return all(same_settings(meta.get(k), now[k], defaults[k]) for k in keys)


#: What must be equal for a run to be resumed or reused on "the same data": the folder, the split and the fold's
#: part sizes (a key an older run did not record is not compared).
_DATA_KEYS = ("root", "split_file", "n_folds", "fold", "classes", "n_train", "n_validation", "n_test", "parts")


def same_data(stored: dict | None, now: dict | None) -> bool:
    """Whether a run's recorded ``data`` block describes the data ``now`` asks for (see :data:`_DATA_KEYS`)."""
    stored, now = json.loads(json.dumps(stored or {})), json.loads(json.dumps(now or {}))
    return all(stored[k] == now[k] for k in _DATA_KEYS if k in stored and k in now)


def _started_precision(run_dir: Path) -> str | None:
    """The precision an interrupted run in ``run_dir`` trained its epochs in (None: nothing to resume)."""
    if not (run_dir / rundir.RESUME).is_file() or not (run_dir / rundir.META).is_file():
        return None
    try:
        return (read_meta(run_dir).get("trainable_stages_resolved") or {}).get("precision")
    except MpoxscopeError:  # an unreadable model.json is refused, in one line, by the resume itself
        return None


def _check_same_config(run_dir: Path, meta_now: dict) -> None:
    meta = read_meta(run_dir)
    same = stored_settings_match(meta, meta_now) and meta.get("data", {}).get("fold") == meta_now["data"].get("fold")
    if not (same and same_data(meta.get("data"), meta_now.get("data"))):
        raise MpoxscopeError(f"{run_dir}: holds a run with another configuration; choose a new --out "
                             f"or pass --overwrite")


def run_matches(run_dir: Path, model_cfg: ModelConfig, train_cfg: TrainConfig, data_info: dict | None = None) -> bool:
    """Whether ``run_dir`` holds a run of this configuration on this data (``data_info``, see :func:`same_data`).
    An ensemble's ``model.json`` describes its model by its members, so its training settings and each member's
    own settings are compared. A fold of a cv written with other settings (e.g. without ``--refit``) is trained
    or combined again, not reported under these."""
    if not (run_dir / rundir.META).is_file():
        return False
    meta = read_meta(run_dir)
    if data_info is not None and not same_data(meta.get("data"), data_info):
        return False
    if meta.get("kind") != "ensemble":
        return stored_settings_match(meta, {"model": to_dict(model_cfg), "train": to_dict(train_cfg)})
    from mpoxscope.engine.ensemble import member_configs

    def member_matches(name: str, mc: ModelConfig, tc: TrainConfig) -> bool:
        folder = run_dir / rundir.MEMBERS / name
        return (folder / rundir.META).is_file() and stored_settings_match(
            read_meta(folder), {"model": to_dict(mc), "train": to_dict(tc)})

    return stored_settings_match(meta, {"train": to_dict(train_cfg)}, ("train",)) and all(
        member_matches(*m) for m in member_configs(train_cfg.ensemble, model_cfg, train_cfg))


def same_settings(stored: dict | None, now: dict, defaults: dict) -> bool:
    """Whether a run written with ``stored`` settings is the one ``now`` asks for. A setting missing from
    ``stored`` (a run from a version without it) matches only its default: new settings are added with the
    default that reproduces the old behaviour, so such a run can still be resumed or reused."""
    if not isinstance(stored, dict) or set(stored) - set(now):
        return stored == now
    for key, value in now.items():
        if key not in stored:
            if value != defaults.get(key):
                return False
        elif isinstance(value, dict) and isinstance(defaults.get(key), dict):
            if not same_settings(stored[key], value, defaults[key]):
                return False
        elif stored[key] != value:
            return False
    return True


_Progress = rundir.Progress


def train(data: SampleSet, fold: Fold, model_cfg: ModelConfig, train_cfg: TrainConfig, run_dir: str | Path,
          data_info: dict | None = None, bank: FeatureBank | None = None, images: ImageCache | None = None,
          resume: bool = True, progress: bool = True, log=print) -> TrainResult:
    """Train on ``fold.train``, select on ``fold.validation`` (never on ``fold.test``), write a run directory.

    ``bank`` (trunk outputs) and ``images`` (decoded images) may be shared across the folds of a cross-validation.
    A finished run is not retrained; an interrupted one resumes from its last finished epoch when ``resume``.
    Under torchrun every rank trains its slice of each batch (DDP) and only rank 0 writes.
    """
    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    data_info = {**(data_info or {}), "fold": fold.name}
    if train_cfg.refit_trained:
        from mpoxscope.engine.refit import check_refit_trained

        check_refit_trained(train_cfg)
    finished = _finished_result(run_dir, model_cfg, train_cfg, data_info, resume, log)
    if finished is not None and not _refit_pending(run_dir, train_cfg):
        return finished
    if train_cfg.solver == "logistic":
        return _probe(data, fold, model_cfg, train_cfg, run_dir, data_info, images, progress, log)
    if finished is not None:  # trained by an earlier command, killed before or during its refit
        fold, _ = drop_unreadable(data, fold, train_cfg.skip_bad_images)
        return _refit(finished, data, fold, model_cfg, train_cfg, images, bank, progress, log)
    ctx = distributed.context()
    log = log if ctx.is_main else (lambda *a, **k: None)
    seed_everything(train_cfg.seed)
    device = resolve_device(train_cfg.device)
    if device.type == "cuda" and ctx.active:
        device = torch.device("cuda", ctx.local_rank)
    precision = resolve_precision(device, train_cfg.precision, _started_precision(run_dir) if resume else None)
    fold, skipped = drop_unreadable(data, fold, train_cfg.skip_bad_images)
    for f in skipped:
        log(f"skipped unreadable image: {f}")
    if not fold.train or not fold.validation:
        raise MpoxscopeError(f"{fold.name}: empty training or validation part")
    r = _Setup.build(run_dir, data, fold, model_cfg, train_cfg, data_info, bank, images, device, precision,
                     progress and ctx.is_main, ctx)
    state = _start_or_resume(run_dir, r.model, r.optimizer, r.scheduler, r.meta, resume, log, ctx, r.ema)
    for epoch in range(state.epoch + 1, train_cfg.epochs + 1):
        if state.bad_epochs >= train_cfg.patience:
            break
        _one_epoch(r, state, epoch, run_dir, data, train_cfg, log if progress else None)
    if ctx.is_main:
        meta = finish_run(run_dir, r.model, r.batches, r.stop, data, fold, train_cfg, device, precision, r.meta,
                          state.best_epoch, progress)
        meta["skipped_files"] = skipped
        write_meta(run_dir, meta)
        write_json(run_dir / STATE_FILE, {"status": "finished", "epochs_run": state.epoch,
                                          "best_epoch": state.best_epoch,
                                          "wall_time_s": round(time.perf_counter() - t0, 1),
                                          "skipped_files": skipped})
    distributed.barrier()
    meta = read_meta(run_dir)
    result = TrainResult(run_dir, state.best_epoch, state.epoch, meta["validation"], time.perf_counter() - t0,
                         skipped, False)
    if not _refit_pending(run_dir, train_cfg):
        return result
    images = getattr(r.batches, "images", images)  # the decoded images cover training + validation already
    return _refit(result, data, fold, model_cfg, train_cfg, images, bank, progress, log)


def _refit_pending(run_dir: Path, train_cfg: TrainConfig) -> bool:
    """Whether ``--refit-trained`` asks for a refit this finished AdamW run does not have yet."""
    return (train_cfg.refit_trained and train_cfg.solver == "adamw" and distributed.is_main()
            and not read_meta(run_dir).get("refit"))


def _refit(result: TrainResult, data: SampleSet, fold: Fold, model_cfg: ModelConfig, train_cfg: TrainConfig,
           images: ImageCache | None, bank: FeatureBank | None, progress: bool, log) -> TrainResult:
    """After every choice made on validation: retrain on training + validation (``engine.refit``)."""
    from mpoxscope.engine.refit import refit_trained

    t0 = time.perf_counter()
    refit_trained(result.run_dir, data, fold, model_cfg, train_cfg, images, bank, progress, log)
    result.wall_time_s += time.perf_counter() - t0
    return result


def _probe(data: SampleSet, fold: Fold, model_cfg: ModelConfig, train_cfg: TrainConfig, run_dir: Path,
           data_info: dict, images: ImageCache | None, progress: bool, log) -> TrainResult:
    """A linear probe (``solver="logistic"``): one fit, no epochs (``engine.probe``)."""
    from mpoxscope.engine.probe import check_probe, fit_probe

    check_probe(model_cfg, train_cfg)
    if distributed.context().active:
        raise MpoxscopeError("--solver logistic runs in one process; start it without torchrun")
    fold, skipped = drop_unreadable(data, fold, train_cfg.skip_bad_images)
    return fit_probe(data, fold, model_cfg, train_cfg, run_dir, data_info, images, progress, log, skipped)


@dataclass
class _Setup:
    """Everything one training run holds between epochs."""

    model: SkinLesionNet
    step: nn.Module
    stop: int
    batches: FeatureBatches | ImageBatches
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    meta: dict
    device: torch.device
    precision: str
    ctx: distributed.Context
    ema: nn.Module | None = None  # timm ModelEmaV3 when cfg.ema_decay > 0

    @property
    def evaluated(self) -> SkinLesionNet:
        """The network that is validated, selected and saved: the weight average when there is one."""
        return self.ema.module if self.ema is not None else self.model

    @classmethod
    def build(cls, run_dir: Path, data: SampleSet, fold: Fold, model_cfg: ModelConfig, cfg: TrainConfig,
              data_info: dict, bank, images, device: torch.device, precision: str, progress: bool,
              ctx: distributed.Context) -> _Setup:
        model = create_model(model_cfg, len(data.classes)).to(device)
        stop = model.trunk_stop(cfg.trainable_stages)
        if ctx.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
        batches, bank = _make_batches(model, stop, cfg, data, fold, bank, images, device, progress,
                                      run_dir / rundir.FEATURE_CACHE, ctx)
        weights = class_weights(batches.targets.numpy(), len(data.classes)) if cfg.class_balanced else None
        criterion = nn.CrossEntropyLoss(weight=weights.to(device) if weights is not None else None,
                                        label_smoothing=cfg.label_smoothing)
        optimizer = torch.optim.AdamW(param_groups(model, stop, cfg), weight_decay=cfg.weight_decay)
        steps = max(1, len(batches))
        scheduler = cosine_with_warmup(optimizer, cfg.warmup_epochs * steps, cfg.epochs * steps)
        meta = build_meta(model, data.classes, train=to_dict(cfg), data=data_info,
                          trainable_stages_resolved={"frozen_stages": stop, "total_stages": len(model.stages),
                                                     "cached": bank is not None, "precision": precision,
                                                     "processes": ctx.world_size})
        step = _train_step(model, batches.start, stop, device, ctx)
        return cls(model, step, stop, batches, criterion, optimizer, scheduler, meta, device, precision, ctx,
                   weight_average(model, cfg))


def _one_epoch(r: _Setup, state: _Progress, epoch: int, run_dir: Path, data: SampleSet, cfg: TrainConfig,
               log) -> None:
    """Train, validate, then commit the epoch (rank 0 writes; every rank keeps the same state)."""
    te = time.perf_counter()
    r.batches.set_epoch(epoch)
    record = _train_epoch(r.model, r.step, r.batches, r.stop, r.optimizer, r.scheduler, r.criterion, cfg, r.device,
                          r.precision, epoch, r.ema)
    val, _, _ = validate(r.evaluated, r.batches, r.stop, data.classes, r.device, r.precision)
    improved = _update_best(state, epoch, val)
    record = {"epoch": epoch, **record, "val_loss": val["loss"], "val_accuracy": val["accuracy"],
              "val_f1_macro": val["f1_macro"], "lr": r.scheduler.get_last_lr()[0],
              "seconds": round(time.perf_counter() - te, 2), "best": improved}
    state.epoch = epoch
    state.history.append(record)
    if r.ctx.is_main:  # resume.pt first: a kill before BEST is written is repaired by load_epoch on resume
        rundir.commit_epoch(run_dir, r.model, r.optimizer, r.scheduler, state, ema=r.ema)
        if improved:
            save_weights(r.evaluated, run_dir / rundir.BEST)
    distributed.barrier()
    if log is not None:
        log(f"epoch {epoch:3d}/{cfg.epochs}  train loss {record['train_loss']:.3f} "
            f"acc {record['train_accuracy']:.3f}  val loss {val['loss']:.3f} acc {val['accuracy']:.3f} "
            f"macro-F1 {val['f1_macro']:.3f}  {record['seconds']:.0f} s{'  *' if improved else ''}")


def _one_refit_epoch(r: _Setup, state: _Progress, epoch: int, run_dir: Path, cfg: TrainConfig, log) -> None:
    """One epoch of a refit (``engine.refit``): train on training + validation and commit; nothing to validate."""
    te = time.perf_counter()
    r.batches.set_epoch(epoch)
    record = _train_epoch(r.model, r.step, r.batches, r.stop, r.optimizer, r.scheduler, r.criterion, cfg, r.device,
                          r.precision, epoch, r.ema)
    record = {"epoch": epoch, **record, "lr": r.scheduler.get_last_lr()[0],
              "seconds": round(time.perf_counter() - te, 2)}
    state.epoch = epoch
    state.history.append(record)
    rundir.commit_epoch(run_dir, r.model, r.optimizer, r.scheduler, state, ema=r.ema)
    if log is not None:
        log(f"refit epoch {epoch:3d}  train loss {record['train_loss']:.3f} acc {record['train_accuracy']:.3f}  "
            f"{record['seconds']:.0f} s")


def _finished_result(run_dir: Path, model_cfg: ModelConfig, train_cfg: TrainConfig, data_info: dict,
                     resume: bool, log) -> TrainResult | None:
    state_path = run_dir / STATE_FILE
    if not (state_path.is_file() and resume):
        return None
    _check_same_config(run_dir, {"model": to_dict(model_cfg), "train": to_dict(train_cfg), "data": data_info})
    state = read_json(state_path)
    if state.get("status") != "finished":
        return None
    meta = read_meta(run_dir)
    log(f"{run_dir}: already trained (best epoch {state['best_epoch']}); skipping")
    return TrainResult(run_dir, state["best_epoch"], state["epochs_run"], meta.get("validation", {}), 0.0,
                       state.get("skipped_files", []), resumed=True)


def _start_or_resume(run_dir: Path, model, optimizer, scheduler, meta: dict, resume: bool, log,
                     ctx: distributed.Context = distributed.Context(), ema=None) -> _Progress:
    if resume and (run_dir / rundir.RESUME).is_file():
        _check_same_config(run_dir, meta)
        state = rundir.load_epoch(run_dir, model, optimizer, scheduler, write=ctx.is_main, ema=ema)
        log(f"resuming {run_dir} after epoch {state.epoch}")
        distributed.barrier()
        return state
    distributed.barrier()  # every rank has looked for resume.pt before rank 0 clears the folder
    if ctx.is_main:
        rundir.start(run_dir, meta)
    distributed.barrier()
    return _Progress()


def _update_best(state: _Progress, epoch: int, val: dict) -> bool:
    score = (val["f1_macro"], -val["loss"])
    if score > state.best_score:
        state.best_score, state.best_epoch, state.bad_epochs = score, epoch, 0
        return True
    state.bad_epochs += 1
    return False
