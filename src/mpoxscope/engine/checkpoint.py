"""Checkpoints: weights in safetensors, everything else in a JSON file; loading never unpickles objects.

A run directory holds ``model.json`` (classes, configs, normalisation, metrics), ``best.safetensors`` (selected on
validation macro-F1) and ``last.safetensors``, plus ``resume.pt`` (optimiser state, tensors only).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mpoxscope.config import ModelConfig, from_dict
from mpoxscope.errors import MpoxscopeError
from mpoxscope.fileio import atomic_path, read_json, write_json
from mpoxscope.models.factory import SkinLesionNet, create_model

META_FILE = "model.json"
FORMAT_VERSION = 1


def save_weights(model: torch.nn.Module, path: str | os.PathLike) -> None:
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "mpoxscope", "version": str(FORMAT_VERSION)})


def build_meta(model: SkinLesionNet, classes: list[str], **extra: Any) -> dict[str, Any]:
    """The JSON description of a model: enough to rebuild it and to say how it was made."""
    from mpoxscope import __version__
    from mpoxscope.config import to_dict

    return {
        "format_version": FORMAT_VERSION,
        "mpoxscope_version": __version__,
        "classes": list(classes),
        "model": to_dict(model.config),
        "image_size": model.config.image_size,
        "normalization": {"mean": list(model.mean), "std": list(model.std)},
        "pretrained_source": getattr(model, "pretrained_source", "unknown"),
        **extra,
    }


def write_meta(run_dir: str | os.PathLike, meta: dict[str, Any]) -> None:
    write_json(Path(run_dir) / META_FILE, meta)


def read_meta(run_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(run_dir) / META_FILE
    if not path.is_file():
        raise MpoxscopeError(f"{run_dir}: not a trained run (no {META_FILE}); train one with 'mpoxscope train'")
    try:
        meta = read_json(path)
    except ValueError as e:
        raise MpoxscopeError(f"{path}: not valid JSON ({e})") from None
    for key in ("classes", "model"):
        if key not in meta:
            raise MpoxscopeError(f"{path}: missing field {key!r}")
    return meta


def load_model(run_dir: str | os.PathLike, which: str = "best", device: str | torch.device = "cpu",
               ) -> tuple[SkinLesionNet, dict[str, Any]]:
    """Rebuild a trained model from its run directory (weights ``which``: best or last), in eval mode."""
    run_dir = Path(run_dir)
    meta = read_meta(run_dir)
    weights = run_dir / f"{which}.safetensors"
    if not weights.is_file():
        raise MpoxscopeError(f"{weights}: weights file not found")
    config = from_dict(ModelConfig, meta["model"])
    model = create_model(config, len(meta["classes"]), load_weights=False)
    try:
        state = load_file(str(weights))
        model.load_state_dict(state)
    except Exception as e:  # corrupt file or another architecture
        raise MpoxscopeError(f"{weights}: cannot load weights ({type(e).__name__}: {e})") from None
    model.pretrained_source = meta.get("pretrained_source", "unknown")
    return model.to(device).eval(), meta


def load_inference_model(run_dir: str | os.PathLike, which: str = "best", device: str | torch.device = "cpu",
                         ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model exactly as the run predicts, in eval mode: a single network wrapped in its test-time views
    (``model.json`` → ``tta``), or an ensemble of member runs (``kind: ensemble``), each member with its own
    views and temperature. Its output is treated as logits by every consumer."""
    from mpoxscope.models.tta import TTAModel

    meta = read_meta(run_dir)
    if meta.get("kind") == "ensemble":
        return _load_ensemble(Path(run_dir), meta, which, device), meta
    model, meta = load_model(run_dir, which=which, device=device)
    views = (meta.get("tta") or {}).get("views") or ["id"]
    return (TTAModel(model, tuple(views)).eval() if list(views) != ["id"] else model), meta


def _load_ensemble(run_dir: Path, meta: dict[str, Any], which: str, device) -> torch.nn.Module:
    from mpoxscope.models.ensemble import EnsembleNet

    members, temps = [], []
    for entry in meta.get("members") or []:
        member_dir = (run_dir / str(entry.get("dir", ""))).resolve()
        if run_dir.resolve() not in member_dir.parents:  # model.json must not point outside its own run
            raise MpoxscopeError(f"{run_dir / META_FILE}: member {entry.get('dir')!r} is outside the run directory")
        model, member_meta = load_inference_model(member_dir, which=which, device=device)
        if member_meta["classes"] != meta["classes"] or member_meta["image_size"] != meta["image_size"]:
            raise MpoxscopeError(f"{member_dir}: classes or image size differ from the ensemble's")
        members.append(model)
        temps.append(float((member_meta.get("calibration") or {}).get("temperature", 1.0)))
    if not members:
        raise MpoxscopeError(f"{run_dir / META_FILE}: an ensemble without members")
    return EnsembleNet(members, temps).to(device).eval()
