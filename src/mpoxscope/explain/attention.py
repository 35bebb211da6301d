"""The AGFN head's own explanation: the pooling query's attention over the backbone's H x W feature grid.
An ordinary entry of the method registry ("attention"): class-agnostic, gradient-free, one map per head."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mpoxscope.errors import MpoxscopeError
from mpoxscope.explain.hooks import frozen, model_device
from mpoxscope.registry import MethodSpec, register_method


def has_attention(model: nn.Module) -> bool:
    from mpoxscope.models import AGFNHead

    return isinstance(getattr(model, "head", None), AGFNHead)


def attention_grid(model: nn.Module, batch: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """(N, heads, H, W) float32 CPU tensor: attention from the pooling query to each feature-grid cell, as
    ``model(x, return_attention=True)[1]["pool"]``; each head's map sums to 1 over (H, W)."""
    if not has_attention(model):
        head = type(getattr(model, "head", model)).__name__
        raise MpoxscopeError(f"attention: the model's head ({head}) has no attention weights; only an AGFN "
                             f"head has them. Use a CAM method (e.g. gradcam)")
    out = []
    with frozen(model), torch.inference_mode(False), torch.no_grad():
        dev = model_device(model)
        for i in range(0, len(batch), batch_size):
            _, maps = model(batch[i:i + batch_size].to(dev), return_attention=True)
            out.append(maps["pool"].float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def normalise_maps(maps: torch.Tensor) -> torch.Tensor:
    """Min-max scale each (..., H, W) map to [0, 1]; a constant map becomes all zeros (nothing stands out)."""
    flat = maps.flatten(-2)
    lo, hi = flat.min(dim=-1).values[..., None, None], flat.max(dim=-1).values[..., None, None]
    return ((maps - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)


def upsample_grid(grid: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(N, H, W) or (N, heads, H, W) grid -> same leading dims x ``size``, bilinear, float32 in [0, 1]."""
    lead = grid.shape[:-2]
    flat = grid.reshape(-1, 1, *grid.shape[-2:]).float()
    up = F.interpolate(flat, size=size, mode="bilinear", align_corners=False)
    return normalise_maps(up.reshape(*lead, *size)).numpy().astype(np.float32)


def attention_maps(model: nn.Module, batch: torch.Tensor, per_head: bool = False,
                   batch_size: int = 32) -> np.ndarray:
    """Attention upsampled to the input: (N, S, S) mean over heads, or (N, heads, S, S) with ``per_head``."""
    grid = attention_grid(model, batch, batch_size)
    if not per_head:
        grid = grid.mean(dim=1)
    return upsample_grid(grid, tuple(batch.shape[-2:]))


def _unavailable(model: nn.Module) -> str | None:
    if has_attention(model):
        return None
    return ("this model has no attention weights (an ensemble: explain a member for its AGFN attention, or use "
            "a CAM method)")


def _compute(spec: MethodSpec, model: nn.Module, batch: torch.Tensor, targets, layer,
             batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Maps (N, S, S): the mean over heads, upsampled; parts (N, heads, H, W): each head's raw attention."""
    grid = attention_grid(model, batch, batch_size)
    return upsample_grid(grid.mean(dim=1), tuple(batch.shape[-2:])), grid.numpy()


register_method(MethodSpec(
    "attention", "the AGFN head's pooling-query attention over the feature grid; class-agnostic", _compute,
    class_specific=False, needs_layer=False, available=_unavailable, parts=True, always=True,
    title="AGFN attention (mean over heads)"), aliases=("attn",))
