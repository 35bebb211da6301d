"""How many photos go through one forward pass: photos x test-time views, bounded.

Torch-free, so the web service's ONNX-only runtime can use it without importing torch.
"""

from __future__ import annotations

from typing import Any

#: Images (photo x test-time view, at 224 px) one forward pass may hold. Activation memory grows with it
#: (Lite0 + AGFN on a CPU: 128 images +1.5 GB, 32 images +0.46 GB, 16 images +0.22 GB at the peak) while a
#: CPU's images/s hardly grow past a dozen or so, so a micro-batch runs as several passes of this size.
FORWARD_IMAGES = 16


def views_per_photo(predictor: Any) -> int:
    """How many images one photo becomes in the forward pass: its test-time views (an ensemble runs its
    members one after another, so the most any member uses). Read from the torch model when there is one,
    else from ``model.json`` (an ensemble's own file does not list its members' views: 8, the most there are)."""
    model = getattr(predictor, "model", None)
    modules = getattr(model, "modules", None)
    if callable(modules):
        return max((len(m.views) for m in modules() if isinstance(getattr(m, "views", None), tuple)), default=1)
    meta = getattr(predictor, "meta", None) or {}
    if meta.get("kind") == "ensemble":
        return 8
    return max(1, len((meta.get("tta") or {}).get("views") or ["id"]))


def photos_per_forward(views: int, image_size: int = 224, images: int = FORWARD_IMAGES) -> int:
    """Photos per forward pass so that photos x views x (image_size / 224)^2 stays within ``images``."""
    per_photo = max(1, views) * (max(1, image_size) / 224) ** 2
    return max(1, int(images // per_photo))
