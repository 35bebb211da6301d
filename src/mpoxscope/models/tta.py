"""Test-time augmentation as part of the model: a run records its views in ``model.json`` (``"tta"``), and every
consumer (evaluate, cv, predict, serve, the ONNX export) runs the same wrapped module, so all give the same numbers.

Lesion photos have no canonical orientation, so the views are the symmetries of the square (the dihedral group
D4). The wrapper averages the views' logits: one logits output keeps temperature scaling and ONNX export as they
are for a single view.

>>> import torch
>>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(3))
>>> TTAModel(net, TTA_SETS["flips"])(torch.zeros(2, 3, 8, 8)).shape
torch.Size([2, 3])
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mpoxscope.errors import MpoxscopeError

#: Each view maps a batch (B, C, H, W) to a batch of the same shape (square images).
VIEWS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "id": lambda x: x,
    "hflip": lambda x: torch.flip(x, (3,)),
    "vflip": lambda x: torch.flip(x, (2,)),
    "rot180": lambda x: torch.flip(x, (2, 3)),
    "transpose": lambda x: x.transpose(2, 3),
    "rot90": lambda x: torch.rot90(x, 1, (2, 3)),
    "rot270": lambda x: torch.rot90(x, 3, (2, 3)),
    "antitranspose": lambda x: torch.flip(x, (2, 3)).transpose(2, 3),
}

#: The view sets a run can choose from on validation (``TrainConfig.tta``).
TTA_SETS: dict[str, tuple[str, ...]] = {
    "none": ("id",),
    "flips": ("id", "hflip", "vflip"),
    "d4": tuple(VIEWS),
}


def resolve_views(spec: str | list | tuple | None) -> tuple[str, ...]:
    """A set name (``"flips"``) or a list of view names -> the view names; ``None`` -> no augmentation."""
    if spec is None:
        return ("id",)
    views = TTA_SETS.get(spec) if isinstance(spec, str) else tuple(spec)
    if not views or any(v not in VIEWS for v in views):
        raise MpoxscopeError(f"unknown test-time augmentation {spec!r}; choose one of {', '.join(TTA_SETS)} "
                             f"or a list of {', '.join(VIEWS)}")
    return tuple(views)


class TTAModel(nn.Module):
    """``model`` applied to each view of the input; returns the mean of the views' logits, (B, K)."""

    def __init__(self, model: nn.Module, views: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model
        self.views = resolve_views(views)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.views) == 1:
            return self.model(VIEWS[self.views[0]](x))
        # One forward pass over all views stacked along the batch: faster than a loop on CPU and GPU alike.
        b = x.shape[0]
        out = self.model(torch.cat([VIEWS[v](x) for v in self.views]))
        return out.view(len(self.views), b, -1).mean(0)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # config, stages, head, mean, std ...: the wrapped model's
            return getattr(super().__getattr__("model"), name)
