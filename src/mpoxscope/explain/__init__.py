"""Explanations: Grad-CAM family (pytorch-grad-cam) and AGFN attention maps, overlays, gallery, faithfulness.

``explain`` gives (N, S, S) float32 maps in [0, 1]; ``overlay`` an RGB image at the photo's size:

>>> from mpoxscope.explain import explain, overlay, METHODS
>>> maps = explain(model, batch, "gradcam")  # doctest: +SKIP
>>> overlay(pil_image, maps[0]).save("cam.png")  # doctest: +SKIP

Names resolve lazily, so ``import mpoxscope.explain.cli`` (for ``mpoxscope --help``) does not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "METHODS": "methods", "MethodSpec": "methods", "explain": "methods", "get_method": "methods",
    "parse_methods": "methods", "resolve_target_layer": "methods", "LogitsOnly": "methods",
    "frozen": "methods", "explain_parts": "methods", "slow_methods": "methods", "register_method": "methods",
    "attention_grid": "attention", "attention_maps": "attention", "has_attention": "attention",
    "overlay": "render", "save_overlay_png": "render", "save_panel_png": "render",
    "Explanation": "pipeline", "explain_images": "pipeline",
    "GalleryEntry": "gallery", "write_gallery": "gallery",
    "FaithfulnessConfig": "faithfulness", "FaithfulnessReport": "faithfulness",
    "evaluate_faithfulness": "faithfulness", "randomized_copy": "faithfulness", "spearman": "faithfulness",
}

__all__ = [
    "METHODS",
    "MethodSpec",
    "explain",
    "get_method",
    "parse_methods",
    "resolve_target_layer",
    "LogitsOnly",
    "frozen",
    "explain_parts",
    "slow_methods",
    "register_method",
    "attention_grid",
    "attention_maps",
    "has_attention",
    "overlay",
    "save_overlay_png",
    "save_panel_png",
    "Explanation",
    "explain_images",
    "GalleryEntry",
    "write_gallery",
    "FaithfulnessConfig",
    "FaithfulnessReport",
    "evaluate_faithfulness",
    "randomized_copy",
    "spearman",
]

if TYPE_CHECKING:
    from mpoxscope.explain.attention import attention_grid, attention_maps, has_attention
    from mpoxscope.explain.faithfulness import (
        FaithfulnessConfig,
        FaithfulnessReport,
        evaluate_faithfulness,
        randomized_copy,
        spearman,
    )
    from mpoxscope.explain.gallery import GalleryEntry, write_gallery
    from mpoxscope.explain.methods import (
        METHODS,
        LogitsOnly,
        MethodSpec,
        explain,
        explain_parts,
        frozen,
        get_method,
        parse_methods,
        register_method,
        resolve_target_layer,
        slow_methods,
    )
    from mpoxscope.explain.pipeline import Explanation, explain_images
    from mpoxscope.explain.render import overlay, save_overlay_png, save_panel_png


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mpoxscope.explain' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"mpoxscope.explain.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
