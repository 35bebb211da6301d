"""An ensemble of trained runs as one model: the mean of the members' calibrated probabilities.

``forward`` returns ``log(mean_m softmax(logits_m / T_m))``: treated as logits by every consumer (softmax gives
back the mean probability exactly), so evaluation, prediction, serving and the ONNX export need nothing special.
Members must share the input size and normalisation (they see the same preprocessed batch).

>>> import torch
>>> a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
>>> EnsembleNet([a, b], [1.0, 2.0])(torch.zeros(2, 4)).exp().sum(1)
tensor([1.0000, 1.0000], grad_fn=<SumBackward1>)
"""

from __future__ import annotations

import math

import torch
from torch import nn


class EnsembleNet(nn.Module):
    """Members (each maps (B, 3, S, S) to logits (B, K)) with their temperatures -> (B, K) log mean probability."""

    def __init__(self, members: list[nn.Module], temperatures: list[float]) -> None:
        super().__init__()
        if len(members) != len(temperatures) or not members:
            raise ValueError("one temperature per member, at least one member")
        self.members = nn.ModuleList(members)
        self.register_buffer("inv_temperatures", torch.tensor([1.0 / t for t in temperatures]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logp = torch.stack([torch.log_softmax(m(x).float() * self.inv_temperatures[i], dim=1)
                            for i, m in enumerate(self.members)])
        return torch.logsumexp(logp, dim=0) - math.log(len(self.members))

    @property
    def config(self):
        return self.members[0].config
