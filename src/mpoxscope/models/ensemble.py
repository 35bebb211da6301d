"""An ensemble of trained runs as one model: the mean of the members' calibrated probabilities.

``forward`` returns ``log(mean_m softmax(logits_m / T_m))``: treated as logits by every consumer (softmax gives
back the mean probability exactly), so evaluation, prediction, serving and the ONNX export need nothing special.
Members share the normalisation; a member trained at a smaller input size (``sizes``) gets the batch resized to
its own side (bilinear, antialiased, as the preprocessing resizes a photo), so every consumer feeds one input.

>>> import torch
>>> a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
>>> p = EnsembleNet([a, b], [1.0, 2.0])(torch.zeros(2, 4)).detach().exp()  # (2, 3) probabilities
>>> [round(float(v), 5) for v in p.sum(1)]
[1.0, 1.0]
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class EnsembleNet(nn.Module):
    """Members (member i maps (B, 3, S_i, S_i) to logits (B, K)) with their temperatures -> (B, K) log mean
    probability of a (B, 3, S, S) batch; ``sizes``: S_i per member (None: every member reads S)."""

    def __init__(self, members: list[nn.Module], temperatures: list[float],
                 sizes: list[int | None] | None = None) -> None:
        super().__init__()
        if len(members) != len(temperatures) or not members or (sizes is not None and len(sizes) != len(members)):
            raise ValueError("one temperature (and size, if given) per member, at least one member")
        self.members = nn.ModuleList(members)
        self.sizes = list(sizes) if sizes is not None else [None] * len(members)
        self.register_buffer("inv_temperatures", torch.tensor([1.0 / t for t in temperatures]))

    def member_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        size = self.sizes[i]
        if size is None or tuple(x.shape[-2:]) == (size, size):
            return x
        return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logp = torch.stack([torch.log_softmax(m(self.member_input(x, i)).float() * self.inv_temperatures[i], dim=1)
                            for i, m in enumerate(self.members)])
        return torch.logsumexp(logp, dim=0) - math.log(len(self.members))

    @property
    def config(self):
        return self.members[0].config
