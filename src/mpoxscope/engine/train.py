"""Training: on cached outputs of a frozen trunk (the CPU fast path) or end to end on images (the GPU path).

Both paths share the optimiser (AdamW, cosine schedule with warm-up), the loss (label smoothing, class-balanced
weights), gradient clipping, checkpoint selection on validation macro-F1 with early stopping, and resumability:
``last.safetensors`` + ``resume.pt`` are written atomically after every epoch, and a rerun continues from there.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.utils.class_weight import compute_class_weight
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mpoxscope.config import ModelConfig, TrainConfig, from_dict, to_dict
from mpoxscope.data.dataset import ImageDataset
from mpoxscope.data.images import check_images
from mpoxscope.data.samples import SampleSet
from mpoxscope.data.splits import Fold
from mpoxscope.data.transforms import eval_transform, train_transform
from mpoxscope.engine.checkpoint import build_meta, read_meta, save_weights, write_meta
from mpoxscope.engine.device import autocast, resolve_device
from mpoxscope.engine.features import FeatureBank, build_feature_bank
from mpoxscope.engine.metrics import classification_metrics
from mpoxscope.errors import MpoxscopeError
from mpoxscope.fileio import append_jsonl, atomic_path, read_json, write_json
from mpoxscope.models.factory import SkinLesionNet, create_model

STATE_FILE = "train_state.json"


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
    keep = [i for i in range(len(data)) if str(data.samples[i].path) not in bad]
    keep_set = set(keep)
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


def _param_groups(model: SkinLesionNet, stop: int, cfg: TrainConfig) -> list[dict]:
    """Head at ``lr``, trainable backbone stages at ``backbone_lr``; frozen stages get no gradients."""
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    backbone_params = []
    for stage in model.stages[stop:]:
        for p in stage.parameters():
            p.requires_grad_(True)
            backbone_params.append(p)
    groups = [{"params": list(model.head.parameters()), "lr": cfg.lr}]
    if backbone_params:
        groups.append({"params": backbone_params, "lr": cfg.backbone_lr})
    return groups


class _Batches:
    """Mini-batches for one epoch, from a feature bank (random view per sample) or from images."""

    def __init__(self, model: SkinLesionNet, stop: int, cfg: TrainConfig, data: SampleSet, fold: Fold,
                 bank: FeatureBank | None, device: torch.device) -> None:
        self.stop, self.cfg, self.device = stop, cfg, device
        self.targets = torch.tensor([data.targets[i] for i in fold.train])
        self.val_targets = torch.tensor([data.targets[i] for i in fold.validation])
        if bank is not None:
            self.views, _ = bank.select(fold.train)
            _, self.val_clean = bank.select(fold.validation)
            self.loader = None
        else:
            size = model.config.image_size
            tf = train_transform(size, cfg.augment, model.mean, model.std)
            g = torch.Generator().manual_seed(cfg.seed)
            self.loader = DataLoader(ImageDataset(data, fold.train, tf), batch_size=cfg.batch_size, shuffle=True,
                                     num_workers=cfg.num_workers, generator=g,
                                     drop_last=len(fold.train) > cfg.batch_size)
            self.val_loader = DataLoader(ImageDataset(data, fold.validation, eval_transform(size, model.mean,
                                         model.std)), batch_size=cfg.batch_size, num_workers=cfg.num_workers)

    def __len__(self) -> int:
        if self.loader is not None:
            return len(self.loader)
        return math.ceil(len(self.targets) / self.cfg.batch_size)

    def train_epoch(self, epoch: int):
        """Yield (inputs for ``forward_features(start=stop)``, targets)."""
        if self.loader is not None:
            yield from self.loader
            return
        g = torch.Generator().manual_seed(self.cfg.seed * 7919 + epoch)
        n = len(self.targets)
        order = torch.randperm(n, generator=g)
        view = torch.randint(self.views.shape[0], (n,), generator=g)
        for s in range(0, n, self.cfg.batch_size):
            idx = order[s:s + self.cfg.batch_size]
            if len(idx) < 2 and n > 1:  # a batch of one breaks BatchNorm in trainable stages
                continue
            yield self.views[view[idx], idx].float(), self.targets[idx]

    def validation(self):
        if self.loader is not None:
            yield from self.val_loader
            return
        for s in range(0, len(self.val_targets), 256):
            yield self.val_clean[s:s + 256].float(), self.val_targets[s:s + 256]


@torch.no_grad()
def _validate(model: SkinLesionNet, batches: _Batches, criterion: nn.Module, classes: list[str],
              device: torch.device, precision: str) -> tuple[dict, np.ndarray, np.ndarray]:
    model.eval()
    logits, targets = [], []
    for x, y in batches.validation():
        with autocast(device, precision):
            out = model.head(model.forward_features(x.to(device), start=batches.stop))
        logits.append(out.float().cpu())
        targets.append(y)
    logits_t, targets_t = torch.cat(logits), torch.cat(targets)
    metrics = classification_metrics(targets_t.numpy(), torch.softmax(logits_t, 1).numpy(), classes)
    metrics["loss"] = float(criterion(logits_t, targets_t))
    return metrics, logits_t.numpy(), targets_t.numpy()


def _check_same_config(run_dir: Path, model_cfg: ModelConfig, train_cfg: TrainConfig, data_info: dict) -> None:
    meta = read_meta(run_dir)
    same = (from_dict(ModelConfig, meta["model"]) == model_cfg
            and from_dict(TrainConfig, meta.get("train", {})) == train_cfg
            and meta.get("data", {}).get("fold") == data_info.get("fold"))
    if not same:
        raise MpoxscopeError(f"{run_dir}: holds a run with another configuration; choose a new --out "
                             f"or pass --overwrite")


def train(data: SampleSet, fold: Fold, model_cfg: ModelConfig, train_cfg: TrainConfig, run_dir: str | Path,
          data_info: dict | None = None, bank: FeatureBank | None = None, resume: bool = True,
          progress: bool = True, log=print) -> TrainResult:
    """Train on ``fold.train``, select on ``fold.validation`` (never on ``fold.test``), write a run directory.

    ``bank`` may hold precomputed trunk outputs (see :mod:`mpoxscope.engine.features`) shared across folds.
    Returns the best epoch and its validation metrics. A finished run is not retrained; an interrupted one
    resumes from its last epoch when ``resume`` is true.
    """
    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    data_info = {**(data_info or {}), "fold": fold.name}
    state_path = run_dir / STATE_FILE
    resumed = False
    if state_path.is_file() and resume:
        _check_same_config(run_dir, model_cfg, train_cfg, data_info)
        state = read_json(state_path)
        if state.get("status") == "finished":
            meta = read_meta(run_dir)
            log(f"{run_dir}: already trained (best epoch {state['best_epoch']}); skipping")
            return TrainResult(run_dir, state["best_epoch"], state["epochs_run"], meta.get("validation", {}),
                               0.0, state.get("skipped_files", []), resumed=True)
        resumed = True
    seed_everything(train_cfg.seed)
    device = resolve_device(train_cfg.device)
    fold, skipped = drop_unreadable(data, fold, train_cfg.skip_bad_images)
    for f in skipped:
        log(f"skipped unreadable image: {f}")
    if not fold.train or not fold.validation:
        raise MpoxscopeError(f"{fold.name}: empty training or validation part")

    model = create_model(model_cfg, len(data.classes)).to(device)
    stop = model.trunk_stop(train_cfg.trainable_stages)
    if stop > 0 and train_cfg.cache_views > 0:
        needed = list(fold.train) + list(fold.validation)
        if bank is None or not bank.covers(needed) or bank.key.stop != stop:
            bank = build_feature_bank(model, stop, data, sorted(set(needed)), train_cfg.cache_views,
                                      train_cfg.seed, train_cfg.augment, device, progress=progress)
    else:
        bank = None
        stop = 0 if train_cfg.trainable_stages < 0 else stop

    batches = _Batches(model, stop, train_cfg, data, fold, bank, device)
    weights = class_weights(batches.targets.numpy(), len(data.classes)) if train_cfg.class_balanced else None
    criterion = nn.CrossEntropyLoss(weight=weights.to(device) if weights is not None else None,
                                    label_smoothing=train_cfg.label_smoothing)
    val_criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.AdamW(_param_groups(model, stop, train_cfg), weight_decay=train_cfg.weight_decay)
    steps = max(1, len(batches))
    scheduler = cosine_with_warmup(optimizer, train_cfg.warmup_epochs * steps, train_cfg.epochs * steps)
    scaler = torch.amp.GradScaler(enabled=device.type == "cuda" and train_cfg.precision in ("auto", "fp16")
                                  and not torch.cuda.is_bf16_supported())

    run_dir.mkdir(parents=True, exist_ok=True)
    meta = build_meta(model, data.classes, train=to_dict(train_cfg), data=data_info,
                      trainable_stages_resolved={"frozen_stages": stop, "total_stages": len(model.stages),
                                                 "cached": bank is not None})
    start_epoch, best_score, best_epoch, bad_epochs = 1, (-1.0, 0.0), 0, 0
    if resumed and (run_dir / "resume.pt").is_file():
        from safetensors.torch import load_file

        ckpt = torch.load(run_dir / "resume.pt", map_location="cpu", weights_only=True)
        model.load_state_dict(load_file(str(run_dir / "last.safetensors")))
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch, best_epoch, bad_epochs = ckpt["epoch"] + 1, ckpt["best_epoch"], ckpt["bad_epochs"]
        best_score = (ckpt["best_f1"], ckpt["best_neg_loss"])
        meta = read_meta(run_dir)
        log(f"resuming {run_dir} after epoch {ckpt['epoch']}")
    else:
        for stale in ("metrics.jsonl", "best.safetensors"):
            (run_dir / stale).unlink(missing_ok=True)
        write_meta(run_dir, meta)
        write_json(state_path, {"status": "running", "epochs_run": 0, "best_epoch": 0})

    epoch = start_epoch - 1
    for epoch in range(start_epoch, train_cfg.epochs + 1):
        if bad_epochs >= train_cfg.patience:
            break
        model.train()
        for stage in model.stages[:stop]:
            stage.eval()  # frozen stages keep their BatchNorm statistics
        te = time.perf_counter()
        total, correct, loss_sum = 0, 0, 0.0
        bar = tqdm(batches.train_epoch(epoch), total=len(batches), desc=f"epoch {epoch}/{train_cfg.epochs}",
                   unit="batch", disable=None if progress else True, leave=False)
        for x, y in bar:
            x, y = x.to(device), y.to(device)
            with autocast(device, train_cfg.precision):
                logits = model.head(model.forward_features(x, start=stop))
                loss = criterion(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if train_cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                         train_cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            loss_sum += float(loss.detach()) * len(y)
            total += len(y)
            correct += int((logits.argmax(1) == y).sum())
            bar.set_postfix(loss=f"{loss_sum / total:.3f}")
        val, _, _ = _validate(model, batches, val_criterion, data.classes, device, train_cfg.precision)
        score = (val["f1_macro"], -val["loss"])
        improved = score > best_score
        if improved:
            best_score, best_epoch, bad_epochs = score, epoch, 0
            save_weights(model, run_dir / "best.safetensors")
            meta["validation"] = {**_brief(val), "epoch": epoch, "protocol": _protocol(data_info, "validation")}
            write_meta(run_dir, meta)
        else:
            bad_epochs += 1
        record = {"epoch": epoch, "train_loss": loss_sum / max(1, total), "train_accuracy": correct / max(1, total),
                  "val_loss": val["loss"], "val_accuracy": val["accuracy"], "val_f1_macro": val["f1_macro"],
                  "lr": scheduler.get_last_lr()[0], "seconds": round(time.perf_counter() - te, 2),
                  "best": improved}
        append_jsonl(run_dir / "metrics.jsonl", record)
        if progress:
            log(f"epoch {epoch:3d}  train loss {record['train_loss']:.3f} acc {record['train_accuracy']:.3f}  "
                f"val loss {val['loss']:.3f} acc {val['accuracy']:.3f} macro-F1 {val['f1_macro']:.3f}"
                f"{'  *' if improved else ''}")
        save_weights(model, run_dir / "last.safetensors")
        with atomic_path(run_dir / "resume.pt") as tmp:
            torch.save({"epoch": epoch, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "best_epoch": best_epoch, "bad_epochs": bad_epochs, "best_f1": best_score[0],
                        "best_neg_loss": best_score[1]}, tmp)
        write_json(state_path, {"status": "running", "epochs_run": epoch, "best_epoch": best_epoch})

    # Calibrate the selected model on validation data (temperature scaling, abstain threshold).
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(run_dir / "best.safetensors")))
    val, val_logits, val_targets = _validate(model, batches, val_criterion, data.classes, device,
                                             train_cfg.precision)
    meta["validation"] = {**_brief(val), "epoch": best_epoch, "protocol": _protocol(data_info, "validation")}
    meta["calibration"] = _calibrate(val_logits, val_targets)
    meta["skipped_files"] = skipped
    write_meta(run_dir, meta)
    wall = time.perf_counter() - t0
    write_json(state_path, {"status": "finished", "epochs_run": epoch, "best_epoch": best_epoch,
                            "wall_time_s": round(wall, 1), "skipped_files": skipped})
    return TrainResult(run_dir, best_epoch, epoch, meta["validation"], wall, skipped, resumed)


def _brief(m: dict) -> dict:
    keep = ("n_images", "accuracy", "f1_macro", "precision_macro", "recall_macro", "roc_auc_ovr_macro", "loss")
    return {k: m[k] for k in keep if k in m}


def _protocol(data_info: dict, split: str) -> str:
    return (f"{data_info.get('dataset', '?')}, split {data_info.get('split_source', '?')}, "
            f"{data_info.get('fold', '?')}, {split}")


def _calibrate(logits: np.ndarray, targets: np.ndarray) -> dict:
    try:
        from mpoxscope.engine.calibration import calibrate
    except ImportError:  # calibration module not installed in this build
        return {"temperature": 1.0, "method": "none"}
    return calibrate(logits, targets)
