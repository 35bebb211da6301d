"""The one base mechanism every explanation method runs inside: a logits-only view of the model, and
:func:`frozen`, which puts the model back exactly as it was (train/eval flags, ``requires_grad`` flags,
existing ``.grad``). Imported by :mod:`.methods` and by each method module (no import cycle between them)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch import nn

#: Held while an explanation has hooks on (or flags changed in) a model: one explanation per process at a
#: time. A server that also predicts with the same model object from other threads should hold it too.
LOCK = threading.RLock()


class LogitsOnly(nn.Module):
    """``forward(x)`` -> logits (B, K) only, as pytorch-grad-cam expects a plain tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return out[0] if isinstance(out, tuple) else out


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no parameter gradients inside; on exit every module's mode, every ``requires_grad`` flag
    and every existing ``.grad`` are as they were."""
    with LOCK:  # two threads saving and restoring the same flags would interleave
        modes = [(m, m.training) for m in model.modules()]
        params = list(model.parameters())
        state = [(p.requires_grad, p.grad) for p in params]
        model.eval()
        for p in params:
            p.requires_grad_(False)
        try:
            yield model
        finally:
            for p, (flag, grad) in zip(params, state, strict=True):
                p.requires_grad_(flag)
                p.grad = grad
            for m, mode in modes:
                m.training = mode


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
