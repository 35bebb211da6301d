"""Heads that read a backbone feature map: the Attention-Guided Fusion head (AGFN) and a linear baseline."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mpoxscope.registry import HEADS, register_head

__all__ = ["HEADS", "AGFNHead", "AttentionMaps", "LinearHead"]


class AttentionMaps(dict):
    """Attention weights returned by :meth:`AGFNHead.forward` with ``return_attention=True``.

    ``pool``: (B, heads, H, W), from the pooling query to each grid cell; sums to 1 over (H, W) for each head.
    ``self``: (B, heads, H*W, H*W), the self-attention block's weights.
    """


@register_head("agfn", "AGFN (Attention-Guided Fusion): 1x1 projection of the feature map to tokens with a learned "
                       "2-D position embedding, multi-head self-attention, attention pooling by a learned query, "
                       "fused with global-average-pooled features, linear classifier")
class AGFNHead(nn.Module):
    """Attention-Guided Fusion head.

    feature map (B, C, H, W) -> 1x1 projection to ``d_model`` -> H*W tokens + learned 2-D positional embedding ->
    multi-head self-attention block (residual + LayerNorm + feed-forward) -> attention pooling by a learned query
    to one context vector (B, d_model) -> fused with the global-average-pooled features (B, C), by concatenation
    or a learned gate -> dropout -> linear classifier (B, num_classes).
    """

    def __init__(self, in_channels: int, num_classes: int, d_model: int = 256, num_heads: int = 8,
                 grid_size: tuple[int, int] = (7, 7), ff_mult: int = 2, dropout: float = 0.3,
                 attn_dropout: float = 0.1, fusion: str = "concat") -> None:
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")
        if fusion not in ("concat", "gate"):
            raise ValueError(f"fusion must be 'concat' or 'gate', not {fusion!r}")
        self.in_channels, self.num_classes, self.fusion = in_channels, num_classes, fusion
        self.proj = nn.Conv2d(in_channels, d_model, kernel_size=1)
        self.pos_embed = nn.Parameter(torch.zeros(1, d_model, *grid_size))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.self_attn = nn.MultiheadAttention(d_model, num_heads, dropout=attn_dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, ff_mult * d_model), nn.GELU(), nn.Dropout(attn_dropout),
                                 nn.Linear(ff_mult * d_model, d_model))
        self.norm2 = nn.LayerNorm(d_model)
        self.pool_query = nn.Parameter(torch.zeros(1, 1, d_model))
        nn.init.trunc_normal_(self.pool_query, std=0.02)
        self.pool_attn = nn.MultiheadAttention(d_model, num_heads, batch_first=True)
        if fusion == "gate":
            self.pooled_proj = nn.Linear(in_channels, d_model)
            self.gate = nn.Linear(2 * d_model, d_model)
            fused_dim = d_model
        else:
            fused_dim = d_model + in_channels
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(fused_dim, num_classes)

    def _pos_embed(self, h: int, w: int) -> torch.Tensor:
        pos = self.pos_embed
        if pos.shape[-2:] != (h, w):  # another input size: resample the learned grid
            pos = F.interpolate(pos, size=(h, w), mode="bilinear", align_corners=False)
        return pos

    def forward(self, features: torch.Tensor, return_attention: bool = False):
        """features (B, C, H, W) -> logits (B, num_classes) [, AttentionMaps]."""
        b, _, h, w = features.shape
        pooled = features.mean(dim=(2, 3))  # (B, C)
        tokens = (self.proj(features) + self._pos_embed(h, w)).flatten(2).transpose(1, 2)  # (B, HW, d)
        attended, self_w = self.self_attn(tokens, tokens, tokens, need_weights=return_attention,
                                          average_attn_weights=False)
        tokens = self.norm1(tokens + attended)
        tokens = self.norm2(tokens + self.ffn(tokens))
        query = self.pool_query.expand(b, -1, -1)
        context, pool_w = self.pool_attn(query, tokens, tokens, need_weights=return_attention,
                                         average_attn_weights=False)
        context = context.squeeze(1)  # (B, d)
        if self.fusion == "gate":
            p = self.pooled_proj(pooled)
            g = torch.sigmoid(self.gate(torch.cat([context, p], dim=1)))
            fused = g * context + (1 - g) * p
        else:
            fused = torch.cat([context, pooled], dim=1)
        logits = self.classifier(self.dropout(fused))
        if not return_attention:
            return logits
        maps = AttentionMaps(pool=pool_w.squeeze(2).reshape(b, -1, h, w), self=self_w)
        return logits, maps


@register_head("linear", "linear baseline: global average pooling, dropout, linear classifier")
class LinearHead(nn.Module):
    """Ablation baseline: global-average-pooled features -> dropout -> linear classifier."""

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.3) -> None:
        super().__init__()
        self.in_channels, self.num_classes = in_channels, num_classes
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(in_channels, num_classes)

    def forward(self, features: torch.Tensor, return_attention: bool = False):
        logits = self.classifier(self.dropout(features.mean(dim=(2, 3))))
        return (logits, AttentionMaps()) if return_attention else logits

