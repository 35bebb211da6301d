"""Mixup / CutMix of a batch: the mixture is what it claims (lam, box, labels), draws are reproducible."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from mpoxscope.config import ModelConfig, TrainConfig
from mpoxscope.engine.cli import check_train_options
from mpoxscope.engine.mixing import BatchMixer, Mixed, cutmix_box, weight_average
from mpoxscope.errors import MpoxscopeError


def batch(n=6, size=16):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, size, size, generator=g), torch.arange(n) % 3


def test_mixup_is_the_convex_combination_with_the_reversed_batch():
    x, y = batch()
    m = BatchMixer(mixup_alpha=0.4)(x, y, BatchMixer.generator(0, 1, 0))
    assert 0 < m.lam < 1
    assert torch.allclose(m.x, m.lam * x + (1 - m.lam) * x.flip(0))
    assert torch.equal(m.y_a, y) and torch.equal(m.y_b, y.flip(0))


def test_cutmix_pastes_one_box_and_lam_is_the_area_kept():
    x, y = batch(size=32)
    m = BatchMixer(cutmix_alpha=1.0)(x, y, BatchMixer.generator(0, 3, 0))
    changed = (m.x != x).any(1)  # (B, H, W): pixels taken from the reversed batch
    assert abs(float(changed[0].float().mean()) - (1 - m.lam)) < 1e-9
    assert torch.equal(changed[0], changed[1])  # the same box on every image
    box, kept = cutmix_box((10, 20), 0.75, np.random.default_rng(0))
    y0, y1, x0, x1 = box
    assert 0 <= y0 <= y1 <= 10 and 0 <= x0 <= x1 <= 20
    assert kept == pytest.approx(1 - (y1 - y0) * (x1 - x0) / 200)


def test_draws_depend_on_seed_epoch_and_rank_only():
    x, y = batch()
    mixer = BatchMixer(mixup_alpha=0.4, cutmix_alpha=1.0)
    a = [mixer(x, y, BatchMixer.generator(0, 2, 0)).lam for _ in range(3)]
    b = [mixer(x, y, BatchMixer.generator(0, 2, 0)).lam for _ in range(3)]
    c = mixer(x, y, BatchMixer.generator(0, 3, 0)).lam
    assert a == b and c != a[0]


def test_loss_of_an_unmixed_batch_is_the_plain_loss_and_a_mixture_interpolates():
    logits, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    ce = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5]), label_smoothing=0.1)
    assert torch.equal(Mixed(logits, y, y.flip(0), 1.0).loss(ce, logits), ce(logits, y))
    mixed = Mixed(logits, y, y.flip(0), 0.3).loss(ce, logits)
    assert torch.allclose(mixed, 0.3 * ce(logits, y) + 0.7 * ce(logits, y.flip(0)))
    assert BatchMixer(mixup_alpha=1.0)(logits[:1], y[:1], np.random.default_rng(0)).lam == 1.0  # nothing to mix


def test_off_by_default_and_options_checked():
    assert BatchMixer.from_config(TrainConfig()) is None and weight_average(nn.Linear(2, 2), TrainConfig()) is None
    ema = weight_average(nn.Linear(2, 2), TrainConfig(ema_decay=0.99))
    assert ema is not None and ema.get_decay(1000) <= 0.99
    for bad, field in ((dict(ema_decay=1.0), "--ema-decay"), (dict(mixup=-1.0), "--mixup"),
                       (dict(cutmix=-0.5), "--cutmix")):
        with pytest.raises(MpoxscopeError, match=field):
            check_train_options(ModelConfig(), dataclasses.replace(TrainConfig(), **bad))
