"""Explain PIL images with a trained run: calibrated predictions, maps of several methods, attention.

>>> from mpoxscope.engine.predict import Predictor                      # doctest: +SKIP
>>> p = Predictor.from_run("runs/fold1")                                 # doctest: +SKIP
>>> [e] = explain_images(p, [load_image("x.jpg")], ["gradcam", "attention"])  # doctest: +SKIP
>>> e.label, e.confidence, e.maps["gradcam"].shape                       # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from mpoxscope.errors import MpoxscopeError
from mpoxscope.explain.methods import METHODS, explain_parts, get_method


@dataclass
class Explanation:
    """One image explained.

    ``probabilities``: (K,) calibrated; ``maps[method]``: (S, S) float32 in [0, 1] at the model's input size
    (the whole photo resized, so it maps onto the photo by resizing); ``parts[method]``: (P, H, W) raw grids
    of a method that has them (attention: one per head, each summing to 1); ``seconds[method]``: this image's
    share of the batch's compute time.
    """

    image: Image.Image
    probabilities: np.ndarray
    label: str
    confidence: float
    target: str
    maps: dict[str, np.ndarray] = field(default_factory=dict)
    parts: dict[str, np.ndarray] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def attention_heads(self) -> np.ndarray | None:
        """(heads, H, W) raw pooling attention when "attention" was asked for."""
        return self.parts.get("attention")


def resolve_class(name: str, classes: Sequence[str]) -> int:
    """Index of class ``name`` (case-insensitive; the aliases data folders accept, e.g. Monkeypox -> Mpox)."""
    from mpoxscope.data.classes import canonical_class

    lowered = [c.lower() for c in classes]
    for candidate in (name.strip(), canonical_class(name)):
        if candidate.lower() in lowered:
            return lowered.index(candidate.lower())
    raise MpoxscopeError(f"--target-class: unknown class {name!r}; the run's classes are {', '.join(classes)}")


def panel_methods(methods: Sequence[str], model: torch.nn.Module, with_attention: bool = True) -> list[str]:
    """Canonical names of ``methods``, then the methods declared ``always`` (the AGFN attention) that this
    model allows, last (the panel reads original | chosen methods | attention)."""
    names = list(dict.fromkeys(get_method(m).name for m in methods))
    always = [n for n, spec in METHODS.items() if spec.always and
              (n in names or (with_attention and not (spec.available and spec.available(model))))]
    return [n for n in names if n not in always] + always


def explain_images(predictor, images: Sequence[Image.Image], methods: Sequence[str] = ("gradcam",),
                   target_class: str | None = None, *, target_layer: str | None = None,
                   batch_size: int = 16) -> list[Explanation]:
    """Explain RGB ``images`` with ``predictor`` (a :class:`mpoxscope.engine.predict.Predictor`).

    Each CAM method explains ``target_class`` (by name) or, by default, each image's predicted class.
    """
    names = [get_method(m).name for m in methods]
    target_idx = None if target_class is None else resolve_class(target_class, predictor.classes)
    model = predictor.explain_model  # the single-view network (the run's test-time views average its outputs)
    results: list[Explanation] = []
    for start in range(0, len(images), batch_size):
        chunk = list(images[start:start + batch_size])
        batch = predictor.preprocess(chunk)
        probs = predictor.probabilities(predictor.logits(batch))  # as predict reports them
        predicted = probs.argmax(axis=1)
        targets = [int(k) for k in predicted] if target_idx is None else [target_idx] * len(chunk)
        maps: dict[str, np.ndarray] = {}
        parts: dict[str, np.ndarray] = {}
        seconds: dict[str, float] = {}
        for name in names:
            t0 = time.perf_counter()
            maps[name], grid = explain_parts(model, batch, name, targets, target_layer=target_layer,
                                             batch_size=batch_size)
            if grid is not None:
                parts[name] = grid
            seconds[name] = (time.perf_counter() - t0) / len(chunk)
        for i, img in enumerate(chunk):
            k = int(predicted[i])
            results.append(Explanation(
                image=img, probabilities=probs[i], label=predictor.classes[k], confidence=float(probs[i, k]),
                target=predictor.classes[targets[i]], maps={n: m[i] for n, m in maps.items()},
                parts={n: g[i] for n, g in parts.items()}, seconds=dict(seconds)))
    return results
