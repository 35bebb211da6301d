"""Checkpoints: weights in safetensors, everything else in a JSON file; loading never unpickles objects.

A run directory holds ``model.json`` (classes, configs, normalisation, metrics), ``best.safetensors`` (selected on
validation macro-F1) and ``last.safetensors``, plus ``resume.pt`` (optimiser state, tensors only).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from mpoxscope.config import ModelConfig, from_dict
from mpoxscope.engine import rundir
from mpoxscope.errors import MpoxscopeError
from mpoxscope.fileio import read_json
from mpoxscope.models.factory import SkinLesionNet, create_model

META_FILE = rundir.META
FORMAT_VERSION = rundir.FORMAT_VERSION
save_weights = rundir.save_weights
write_meta = rundir.write_meta


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


def read_meta(run_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(run_dir) / META_FILE
    if not path.is_file():
        raise MpoxscopeError(f"{run_dir}: not a trained run (no {META_FILE}); train one with 'mpoxscope train'")
    try:
        meta = read_json(path)
    except (ValueError, UnicodeDecodeError) as e:
        raise MpoxscopeError(f"{path}: not valid JSON ({e})") from None
    validate_meta(meta, path)
    meta.setdefault("image_size", meta["model"]["image_size"])  # validated: one of the two holds it
    return meta


# --- model.json schema: every field a predictor relies on is checked at load, with one line naming it ---------

def _bad(where: str | os.PathLike, field: str, rule: str, value: Any) -> MpoxscopeError:
    shown = repr(value)
    return MpoxscopeError(f"{where}: field {field!r} must be {rule} (got {shown[:60]})")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_numbers(where, field: str, values: Any, n: int | None, positive: bool = False) -> None:
    rule = f"a list of {n or 'K'} finite numbers" + (" > 0" if positive else "")
    if not isinstance(values, list) or (n is not None and len(values) != n) \
            or not all(_is_finite(v) and (not positive or v > 0) for v in values):
        raise _bad(where, field, rule, values)


def validate_meta(meta: Any, where: str | os.PathLike = META_FILE) -> None:
    """Refuse a ``model.json`` whose fields have the wrong type or an unusable value (raises
    :class:`MpoxscopeError` naming the field): a hand-edited or damaged file must fail here, in one line, not
    as a traceback deep in a predictor or as nonsense probabilities."""
    if not isinstance(meta, dict):
        raise MpoxscopeError(f"{where}: not a JSON object")
    for key in ("classes", "model"):
        if key not in meta:
            raise MpoxscopeError(f"{where}: missing field {key!r}")
    classes = meta["classes"]
    if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) and c.strip()
                                                                    for c in classes) \
            or len(set(classes)) != len(classes):
        raise _bad(where, "classes", "a list of at least two distinct class names", classes)
    model = meta["model"]
    if not isinstance(model, dict):
        raise _bad(where, "model", "an object (the model configuration)", model)
    size = meta.get("image_size", model.get("image_size"))
    if not _is_int(size) or not 16 <= size <= 4096:
        raise _bad(where, "image_size", "an integer from 16 to 4096", size)
    _check_model_config(where, model)
    norm = meta.get("normalization")
    if norm is not None:
        if not isinstance(norm, dict):
            raise _bad(where, "normalization", "an object with mean and std", norm)
        _check_numbers(where, "normalization.mean", norm.get("mean"), 3)
        _check_numbers(where, "normalization.std", norm.get("std"), 3, positive=True)
    cal = meta.get("calibration")
    if cal is not None:
        _check_calibration(where, cal, len(classes))
    _check_structure(where, meta)
    _check_record(where, meta)


def _check_record(where, meta: dict) -> None:
    """``data`` and ``train``: what evaluate, cv and ensemble read back to rebuild a run's folds and seed."""
    for key in ("data", "train"):
        if meta.get(key) is not None and not isinstance(meta[key], dict):
            raise _bad(where, key, "an object", meta[key])
    data, train = meta.get("data") or {}, meta.get("train") or {}
    if "seed" in train and not _is_int(train["seed"]):
        raise _bad(where, "train.seed", "an integer", train["seed"])
    if data.get("n_folds") is not None and not (_is_int(data["n_folds"]) and data["n_folds"] >= 2):
        raise _bad(where, "data.n_folds", "an integer of at least 2", data["n_folds"])
    for key in ("root", "fold", "split_file"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise _bad(where, f"data.{key}", "a string", data[key])


def _check_structure(where, meta: dict) -> None:
    """``kind``, ``members`` and ``tta``: what decides which network is built (a wrong type would otherwise be an
    AttributeError in every predictor)."""
    from mpoxscope.models.tta import VIEWS

    if meta.get("kind", "single") not in ("single", "ensemble", None):
        raise _bad(where, "kind", "'ensemble' or absent", meta.get("kind"))
    members = meta.get("members")
    if members is not None and not (isinstance(members, list) and all(
            isinstance(m, dict) and isinstance(m.get("dir"), str) for m in members)):
        raise _bad(where, "members", 'a list of {"dir": "members/NAME"} objects', members)
    tta = meta.get("tta")
    if tta is not None:
        views = tta.get("views") if isinstance(tta, dict) else None
        if not isinstance(tta, dict) or (views is not None and not (
                isinstance(views, list) and views and all(isinstance(v, str) and v in VIEWS for v in views))):
            raise _bad(where, "tta", f"an object whose views are a list of {', '.join(VIEWS)}", tta)


def _check_model_config(where, model: dict) -> None:
    for key in ("backbone", "head", "fusion", "pretrained"):
        if key in model and not isinstance(model[key], str):
            raise _bad(where, f"model.{key}", "a string", model[key])
    from mpoxscope.registry import HEADS

    if model.get("head", "agfn") not in HEADS:
        raise _bad(where, "model.head", f"one of {', '.join(HEADS)}", model.get("head"))
    if model.get("fusion", "concat") not in ("concat", "gate"):
        raise _bad(where, "model.fusion", "'concat' or 'gate'", model.get("fusion"))
    for key in ("image_size", "d_model", "num_heads", "ff_mult"):
        if key in model and (not _is_int(model[key]) or model[key] < 1):
            raise _bad(where, f"model.{key}", "a positive integer", model[key])
    heads, width = model.get("num_heads", 8), model.get("d_model", 256)
    if model.get("head", "agfn") == "agfn" and width % heads:
        raise _bad(where, "model.num_heads", f"a divisor of model.d_model ({width})", heads)
    for key in ("dropout", "attn_dropout"):
        if key in model and not (_is_finite(model[key]) and 0 <= model[key] < 1):
            raise _bad(where, f"model.{key}", "a number in [0, 1)", model[key])


def _check_calibration(where, cal: Any, k: int) -> None:
    if not isinstance(cal, dict):
        raise _bad(where, "calibration", "an object", cal)
    if "temperature" in cal and not (_is_finite(cal["temperature"]) and cal["temperature"] > 0):
        raise _bad(where, "calibration.temperature", "a finite number > 0", cal["temperature"])
    if cal.get("method") == "vector":
        _check_numbers(where, "calibration.vector_w", cal.get("vector_w"), k)
        _check_numbers(where, "calibration.vector_b", cal.get("vector_b"), k)


def load_model(run_dir: str | os.PathLike, which: str = "best", device: str | torch.device = "cpu",
               ) -> tuple[SkinLesionNet, dict[str, Any]]:
    """Rebuild a trained model from its run directory (weights ``which``: best or last), in eval mode."""
    run_dir = Path(run_dir)
    meta = read_meta(run_dir)
    weights = rundir.require_weights(run_dir, which)
    config = from_dict(ModelConfig, meta["model"])
    model = create_model(config, len(meta["classes"]), load_weights=False)
    try:
        state = load_file(str(weights))
        model.load_state_dict(state)
    except Exception as e:  # corrupt file or another architecture
        raise MpoxscopeError(f"{weights}: cannot load weights ({type(e).__name__}: {e})") from None
    bad = next((k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:  # NaN/inf weights would give NaN probabilities, reported as some class
        raise MpoxscopeError(f"{weights}: weight {bad!r} holds NaN or infinite values; the file is damaged")
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

    members, temps, sizes = [], [], []
    for entry in meta.get("members") or []:
        member_dir = (run_dir / str(entry.get("dir", ""))).resolve()
        if run_dir.resolve() not in member_dir.parents:  # model.json must not point outside its own run
            raise MpoxscopeError(f"{run_dir / META_FILE}: member {entry.get('dir')!r} is outside the run directory")
        model, member_meta = load_inference_model(member_dir, which=which, device=device)
        if member_meta["classes"] != meta["classes"] or member_meta.get("normalization") != meta.get("normalization"):
            raise MpoxscopeError(f"{member_dir}: classes or normalisation differ from the ensemble's")
        if int(member_meta["image_size"]) > int(meta["image_size"]):  # members resize down, never up
            raise MpoxscopeError(f"{member_dir}: image size {member_meta['image_size']} is larger than the "
                                 f"ensemble's {meta['image_size']}")
        members.append(model)
        temps.append(float((member_meta.get("calibration") or {}).get("temperature", 1.0)))
        sizes.append(int(member_meta["image_size"]))
    if not members:
        raise MpoxscopeError(f"{run_dir / META_FILE}: an ensemble without members")
    return EnsembleNet(members, temps, sizes).to(device).eval()
