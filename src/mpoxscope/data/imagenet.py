"""ImageNet normalisation, defined once. Torch-free, so the torch-free ONNX runtime can read it too."""

from __future__ import annotations

from typing import Any

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def normalization(meta: dict[str, Any]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of a run's ``model.json``; ImageNet's where it records none (older runs)."""
    norm = meta.get("normalization") or {}
    return tuple(norm.get("mean", IMAGENET_MEAN)), tuple(norm.get("std", IMAGENET_STD))
