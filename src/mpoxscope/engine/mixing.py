"""Mixup and CutMix of a training batch, and the exponential moving average of the weights (two regularisers of
the recipe search; both off by default).

Mixing follows timm's ``Mixup`` (Zhang et al. 2018, Yun et al. 2019): each batch is mixed with itself reversed,
with ``lam ~ Beta(alpha, alpha)``; when both are on, CutMix is chosen with probability ``switch_prob``; a CutMix
box's ``lam`` is corrected to the area actually kept. The loss is ``lam * CE(y) + (1 - lam) * CE(y reversed)``,
which keeps the class weights and the label smoothing of the plain loss. timm's class draws from numpy's global
random state; here every draw comes from a generator seeded by (seed, epoch, rank), so a resumed epoch mixes
exactly as the uninterrupted one did. On the frozen-trunk path the batch is the cached trunk output, so mixing
there is "manifold" mixup of feature maps (CutMix cuts the same box out of the feature grid).

The weight average is timm's ``ModelEmaV3`` with its warm-up (decay ``1 - (1 + step) ** -0.75``, capped at
``ema_decay``), so short runs (a few hundred steps here) are not dominated by their first weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from mpoxscope.config import TrainConfig


@dataclass
class Mixed:
    """A mixed batch: inputs, the two label sets and the weight of the first."""

    x: torch.Tensor
    y_a: torch.Tensor
    y_b: torch.Tensor
    lam: float

    def loss(self, criterion: nn.Module, logits: torch.Tensor) -> torch.Tensor:
        if self.lam >= 1.0:
            return criterion(logits, self.y_a)
        return self.lam * criterion(logits, self.y_a) + (1 - self.lam) * criterion(logits, self.y_b)


@dataclass(frozen=True)
class BatchMixer:
    """Mixup (``mixup_alpha``) and/or CutMix (``cutmix_alpha``) of (B, C, H, W) batches; 0 turns one off."""

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    switch_prob: float = 0.5

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> BatchMixer | None:
        return cls(cfg.mixup, cfg.cutmix) if cfg.mixup > 0 or cfg.cutmix > 0 else None

    @staticmethod
    def generator(seed: int, epoch: int, rank: int) -> np.random.Generator:
        return np.random.default_rng([seed, epoch, rank, 0x6D6978])

    def __call__(self, x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator) -> Mixed:
        if len(y) < 2:
            return Mixed(x, y, y, 1.0)
        cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or rng.random() < self.switch_prob)
        alpha = self.cutmix_alpha if cutmix else self.mixup_alpha
        lam = float(rng.beta(alpha, alpha))
        other = x.flip(0)
        if cutmix:
            (y0, y1, x0, x1), lam = cutmix_box(x.shape[-2:], lam, rng)
            x = x.clone()
            x[..., y0:y1, x0:x1] = other[..., y0:y1, x0:x1]
        else:
            x = x * lam + other * (1 - lam)
        return Mixed(x, y, y.flip(0), lam)


def cutmix_box(size: tuple[int, int], lam: float, rng: np.random.Generator) -> tuple[tuple[int, int, int, int],
                                                                                     float]:
    """A box covering about ``1 - lam`` of an (H, W) grid, centred at random and clipped to it, and the share
    of the grid left outside it (the corrected ``lam``), as timm's ``rand_bbox`` + area correction."""
    h, w = int(size[0]), int(size[1])
    ratio = np.sqrt(1 - lam)
    ch, cw = int(h * ratio), int(w * ratio)
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    y0, y1 = np.clip(cy - ch // 2, 0, h), np.clip(cy + ch // 2, 0, h)
    x0, x1 = np.clip(cx - cw // 2, 0, w), np.clip(cx + cw // 2, 0, w)
    kept = 1 - float((y1 - y0) * (x1 - x0)) / (h * w)
    return (int(y0), int(y1), int(x0), int(x1)), kept


def weight_average(model: nn.Module, cfg: TrainConfig):
    """timm's ``ModelEmaV3`` of ``model`` (its ``.module`` is the averaged network), or None when off."""
    if cfg.ema_decay <= 0:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True, warmup_power=0.75)
