"""Choosing test-time views and fitting calibration score validation images in passes of bounded size."""

import numpy as np
import torch

from mpoxscope.engine.finish import logits_of
from mpoxscope.engine.passes import FORWARD_IMAGES
from mpoxscope.models.tta import TTAModel


class _Mean(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([x.mean((1, 2, 3)), x[:, :, :4].mean((1, 2, 3))], 1)


def test_tta_validation_logits_use_bounded_passes_and_match_one_pass():
    net = _Mean()
    sizes = []
    net.register_forward_hook(lambda mod, inp, out: sizes.append(inp[0].shape[0]))
    x = torch.randn(5, 3, 224, 224)  # the pass budget is in 224-px images
    model = TTAModel(net, "d4")
    out = logits_of(model, x, torch.device("cpu"))
    assert out.shape == (5, 2) and max(sizes) <= FORWARD_IMAGES and sum(sizes) == 5 * 8
    np.testing.assert_allclose(out, logits_of(model, x, torch.device("cpu"), batch_size=5), atol=1e-6)
