"""Inference on images: a :class:`Predictor` wraps a trained run for notebooks, the CLI and the web service."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mpoxscope.data.imagenet import normalization
from mpoxscope.data.images import is_image_file, load_image
from mpoxscope.data.transforms import eval_transform
from mpoxscope.engine.checkpoint import load_inference_model
from mpoxscope.engine.device import resolve_device
from mpoxscope.engine.passes import photos_per_forward, views_per_photo
from mpoxscope.engine.screening import Decision, decide
from mpoxscope.errors import ImageError, MpoxscopeError


@dataclass
class Prediction:
    """One image's result: ``probabilities`` maps every class to its probability; ``error`` is set instead when
    the image could not be read."""

    source: str
    label: str | None = None
    confidence: float | None = None
    probabilities: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    #: What the user is told (screening referral, uncertain, or the class): the same rule as the API and page.
    decision: Decision | None = None


class Predictor:
    """Class probabilities (N, K) for N RGB images, with the run's preprocessing and temperature.

    >>> p = Predictor.from_run("runs/fold1")  # doctest: +SKIP
    >>> p.predict_images([img])  # doctest: +SKIP
    """

    def __init__(self, model: torch.nn.Module | None, meta: dict, device: torch.device) -> None:
        self.model = model.eval() if model is not None else None  # None: a subclass computes logits elsewhere
        self.meta = meta
        self.device = device
        self.classes: list[str] = list(meta["classes"])
        self.image_size: int = int(meta["image_size"])
        self.transform = eval_transform(self.image_size, *normalization(meta))
        self.temperature: float = float(meta.get("calibration", {}).get("temperature", 1.0))

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, device: str = "auto", which: str = "best") -> Predictor:
        """The run as it predicts: its test-time views, or its ensemble members (see ``load_inference_model``)."""
        dev = resolve_device(device)
        model, meta = load_inference_model(run_dir, which=which, device=dev)
        predictor = cls(model, meta, dev)
        predictor.run_dir, predictor.which = Path(run_dir), which
        return predictor

    @property
    def explain_model(self) -> torch.nn.Module:
        """The network explanation methods hook into: the trained network without its test-time views (their
        stacked batch is not one image per map), and for an ensemble the same average over its members' single-
        view networks, each with its temperature (CAMs then average the members' maps)."""
        from mpoxscope.models.ensemble import EnsembleNet

        def single(m: torch.nn.Module) -> torch.nn.Module:
            inner = getattr(m, "model", None)  # TTAModel -> the network it wraps
            return inner if isinstance(inner, torch.nn.Module) else m

        if isinstance(self.model, EnsembleNet):
            temps = [1.0 / float(t) for t in self.model.inv_temperatures]
            return EnsembleNet([single(m) for m in self.model.members], temps, self.model.sizes).eval()
        return single(self.model) if self.model is not None else self.model

    def probabilities(self, logits: torch.Tensor) -> np.ndarray:
        """(N, K) calibrated probabilities from the model's (N, K) outputs."""
        return calibrated_softmax(logits, self.meta.get("calibration") or {})

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """RGB PIL images -> (N, 3, S, S) normalised batch."""
        return torch.stack([self.transform(img.convert("RGB")) for img in images])

    @torch.no_grad()
    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model(batch.to(self.device)).float().cpu()

    def predict_images(self, images: list[Image.Image], batch_size: int | None = None) -> np.ndarray:
        """(N, K) calibrated class probabilities for RGB images. ``batch_size``: photos per forward pass;
        default: as many as keep photos x test-time views within ``passes.FORWARD_IMAGES`` (16 photos x 8 views
        in one pass cost more CPU per image than eight passes of 16 images, and ~1.3 GB more memory)."""
        if batch_size is None:
            batch_size = photos_per_forward(views_per_photo(self), self.image_size)
        out = []
        for i in range(0, len(images), batch_size):
            out.append(self.probabilities(self.logits(self.preprocess(images[i:i + batch_size]))))
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), dtype=np.float32)

    def to_prediction(self, source: str, probs: np.ndarray) -> Prediction:
        k = int(np.argmax(probs))
        decision = decide(probs, self.classes, self.meta.get("calibration"), self.meta.get("screening"))
        return Prediction(source, self.classes[k], float(probs[k]),
                          {c: float(p) for c, p in zip(self.classes, probs)}, decision=decision)

    def predict_paths(self, paths: list[str | os.PathLike], batch_size: int = 16) -> list[Prediction]:
        """Predictions in input order; an unreadable file gets an ``error`` and the others still run."""
        results: list[Prediction | None] = [None] * len(paths)
        ok: list[tuple[int, Image.Image]] = []
        for i, p in enumerate(paths):
            try:
                ok.append((i, load_input(p)))
            except ImageError as e:
                results[i] = Prediction(str(p), error=e.reason)
            if len(ok) == batch_size or (i == len(paths) - 1 and ok):
                probs = self.predict_images([img for _, img in ok])
                for (j, _), pr in zip(ok, probs):
                    results[j] = self.to_prediction(str(paths[j]), pr)
                ok = []
        return [r for r in results if r is not None]


def calibrated_softmax(logits: torch.Tensor, calibration: dict) -> np.ndarray:
    """softmax of calibrated logits (N, K): the run's calibration block (none, temperature or vector scaling)
    applied by ``engine.calibration.apply_calibration``."""
    from mpoxscope.engine.calibration import apply_calibration

    return torch.softmax(apply_calibration(logits, calibration), dim=1).numpy()


def _is_dir(path: Path) -> bool:
    """``Path.is_dir`` that is False, not an exception, for a name the OS refuses (too long, a NUL byte, a folder
    that cannot be entered): such an input is then reported as one unreadable file."""
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def load_input(path: str | os.PathLike) -> Image.Image:
    """One input of :func:`expand_inputs`: its image, or :class:`ImageError` — also for a folder kept with
    ``keep_empty`` ("no images in folder"), so every command reports it as one failed input."""
    if _is_dir(Path(path)):
        raise ImageError(str(path), "no images in folder")
    return load_image(path)


def expand_inputs(inputs: list[str | os.PathLike], keep_empty: bool = False) -> list[Path]:
    """Files as given, folders expanded to the images inside them (recursively, sorted).

    Hidden files and folders (``._x.jpg`` from macOS, ``.thumbnails/``) and anything that is not a regular file
    are left out of a folder's expansion; a file named explicitly is always kept (and reported if unreadable).
    A folder without images is an error, or with ``keep_empty`` kept as itself, for
    :meth:`Predictor.predict_paths` to report while the other inputs still get results."""
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if _is_dir(p):
            found = sorted(f for f in p.rglob("*") if f.is_file() and is_image_file(f)
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found and not keep_empty:
                raise MpoxscopeError(f"{p}: no images in folder")
            paths.extend(found or [p])
        else:
            paths.append(p)
    return paths
