"""What a training run directory holds, and the one atomic commit that ends each epoch.

Files (names defined here only):

* ``model.json`` (META): classes, configurations, normalisation, data protocol, validation metrics, TTA views,
  calibration, screening threshold; ``best.safetensors`` (BEST) and ``last.safetensors`` (LAST): weights;
* ``resume.pt`` (RESUME): the whole state after the last finished epoch — weights, optimiser, scheduler, RNG
  state, best-so-far and the per-epoch history — written in one atomic replace, so a kill at any moment leaves
  either the previous epoch's state or this one's, never a mix; tensors and plain values only (loaded with
  ``weights_only=True``);
* ``metrics.jsonl`` (METRICS): one line per epoch, rewritten from the committed history (never appended twice);
* ``train_state.json`` (STATE): running/finished, for humans and for skipping finished runs;
* ``feature_cache.safetensors`` (FEATURE_CACHE): frozen-trunk outputs, reused only when their digest matches;
* ``model.onnx`` (ONNX) and ``model.int8.onnx`` (INT8): what ``mpoxscope export`` writes by default;
* ``members/`` (MEMBERS): an ensemble's member runs; ``evaluation/`` (EVALUATION): where ``cv`` and the demo
  put a run's test evaluation, and where ``card`` looks for it.

This module imports no torch at load time (the card and the torch-free runtimes read the names).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpoxscope.errors import MpoxscopeError
from mpoxscope.fileio import atomic_path, read_json, write_json, write_text

if TYPE_CHECKING:
    import torch

META = "model.json"
BEST = "best.safetensors"
LAST = "last.safetensors"
RESUME = "resume.pt"
METRICS = "metrics.jsonl"
STATE = "train_state.json"
#: Ensemble runs keep their members' run directories here.
MEMBERS = "members"
#: Outputs of a frozen trunk, keyed by everything they depend on (reused by a resumed run or a rerun).
FEATURE_CACHE = "feature_cache.safetensors"
#: The finished model's calibrated validation probabilities, as the Predictor gives them (cv reads them instead of
#: scoring the validation part a second time).
VALIDATION_PROBS = "validation_probs.npz"
ONNX = "model.onnx"
INT8 = "model.int8.onnx"
#: An evaluation folder (``evaluate``, and each cv fold) holds these two files, among its report and plots.
EVAL_METRICS = "metrics.json"
PREDICTIONS = "predictions.csv"
#: A cross-validation's fold folder: the fold's run, its validation predictions, its test and leak-free test
#: evaluations.
CV_RUN = "run"
VALIDATION = "validation"
EVALUATION = "evaluation"
EVALUATION_LEAK_FREE = "evaluation_leak_free"
#: Version of the weights/metadata format written here (in model.json and in each weights file).
FORMAT_VERSION = 1


@dataclass
class Progress:
    """What one epoch's commit carries besides weights and optimiser state."""

    epoch: int = 0
    best_epoch: int = 0
    bad_epochs: int = 0
    best_score: tuple[float, float] = (-1.0, 0.0)
    history: list[dict] = field(default_factory=list)


def save_weights(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """The model's tensors as safetensors (no pickle), written atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "mpoxscope", "version": str(FORMAT_VERSION)})


def write_meta(run_dir: str | os.PathLike, meta: dict[str, Any]) -> None:
    write_json(Path(run_dir) / META, meta)


def weights_file(run_dir: str | Path, which: str = "best") -> Path:
    """``best.safetensors`` or ``last.safetensors`` of a run."""
    return Path(run_dir) / {"best": BEST, "last": LAST}.get(which, f"{which}.safetensors")


def start(run_dir: Path, meta: dict) -> None:
    """A fresh run: drop what an earlier, different attempt at this run left, then write ``model.json``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in (METRICS, BEST, LAST, RESUME):
        (run_dir / stale).unlink(missing_ok=True)
    remove_partial_writes(run_dir)
    write_meta(run_dir, meta)
    write_json(run_dir / STATE, {"status": "running", "epochs_run": 0, "best_epoch": 0})


def commit_epoch(run_dir: Path, model: torch.nn.Module, optimizer, scheduler, state,
                 ema: torch.nn.Module | None = None) -> None:
    """Make the epoch that just ended durable: one atomic replace of ``resume.pt``, then the derived files.
    ``ema`` (timm ModelEmaV3): its average is kept in ``resume.pt`` and is what ``last.safetensors`` holds."""
    import torch

    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
               "scheduler": scheduler.state_dict(), "rng": rng, "epoch": state.epoch,
               "best_epoch": state.best_epoch, "bad_epochs": state.bad_epochs,
               "best_score": list(state.best_score), "history": json.dumps(state.history)}
    if ema is not None:
        payload["ema"] = ema.module.state_dict()
    with atomic_path(run_dir / RESUME) as tmp:
        torch.save(payload, tmp)
    write_text(run_dir / METRICS, "".join(json.dumps(r) + "\n" for r in state.history))
    save_weights(ema.module if ema is not None else model, run_dir / LAST)
    write_json(run_dir / STATE, {"status": "running", "epochs_run": state.epoch, "best_epoch": state.best_epoch})


def load_epoch(run_dir: Path, model: torch.nn.Module, optimizer, scheduler, write: bool = True,
               ema: torch.nn.Module | None = None):
    """Restore the last committed epoch into ``model``/``optimizer``/``scheduler`` and the RNG; returns the
    progress record (:class:`Progress`). A file that is not what :func:`commit_epoch` writes is refused
    with one line."""
    import torch

    path = run_dir / RESUME
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ema is not None:
            ema.module.load_state_dict(ckpt["ema"])
        torch.set_rng_state(ckpt["rng"]["cpu"])
        if "cuda" in ckpt["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        history = json.loads(ckpt["history"])
        state = Progress(int(ckpt["epoch"]), int(ckpt["best_epoch"]), int(ckpt["bad_epochs"]),
                          tuple(float(v) for v in ckpt["best_score"]), history)
    except Exception as e:  # not ours, truncated, another architecture: never a traceback
        raise MpoxscopeError(f"{path}: not a resumable mpoxscope checkpoint ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200] if str(e) else ''}); pass --no-resume to start "
                             f"over") from None
    if write:  # the history is the truth: drop lines of an epoch that was not committed, and half-written files
        write_text(run_dir / METRICS, "".join(json.dumps(r) + "\n" for r in state.history))
        remove_partial_writes(run_dir)
        # The files derived from the committed epoch, which a kill after resume.pt may have left one epoch behind.
        weights = ema.module if ema is not None else model
        save_weights(weights, run_dir / LAST)
        if state.epoch and state.best_epoch == state.epoch:
            save_weights(weights, run_dir / BEST)
    return state


def remove_partial_writes(run_dir: Path) -> None:
    """Temporary files of atomic writes that a kill interrupted (``.<name>.<random>.tmp``)."""
    for tmp in Path(run_dir).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def member_dirs(run_dir: Path) -> list[Path]:
    return sorted(p for p in (Path(run_dir) / MEMBERS).iterdir() if p.is_dir()) \
        if (Path(run_dir) / MEMBERS).is_dir() else []


def require_weights(run_dir: Path, which: str = "best") -> Path:
    path = weights_file(run_dir, which)
    if not path.is_file():
        raise MpoxscopeError(f"{path}: weights file not found")
    return path


def _temperature(run_dir: Path) -> float:
    try:
        return float((read_json(run_dir / META).get("calibration") or {}).get("temperature", 1.0))
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise MpoxscopeError(f"{run_dir / META}: cannot read its temperature ({e})") from None


def weights_sha256_or_none(run_dir: str | Path | None, which: str = "best") -> str | None:
    """:func:`weights_sha256`, or None where there is nothing to digest (no run folder, no weights): what records
    and checks of "these metrics belong to these weights" use."""
    if run_dir is None:
        return None
    try:
        return weights_sha256(run_dir, which)
    except MpoxscopeError:
        return None


def weights_sha256(run_dir: str | Path, which: str = "best") -> str:
    """Digest of everything that fixes a run's predictions: its weights file, or every member's for an
    ensemble (with each member's temperature, which the ensemble's graph holds), plus the test-time views. An
    exported file records it, so a stale export is detected."""
    import hashlib

    run_dir = Path(run_dir)
    try:
        meta = read_json(run_dir / META)  # the callers have validated it (read_meta); only two fields used here
    except (OSError, ValueError) as e:
        raise MpoxscopeError(f"{run_dir / META}: cannot read ({e})") from None
    h = hashlib.sha256(json.dumps((meta.get("tta") or {}).get("views") or ["id"]).encode())
    if meta.get("kind") == "ensemble":
        for entry in meta.get("members") or []:
            member = run_dir / str(entry.get("dir", ""))
            h.update(weights_sha256(member, which).encode())
            h.update(json.dumps(_temperature(member)).encode())
        return h.hexdigest()
    with open(require_weights(run_dir, which), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
