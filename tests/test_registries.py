"""Registries: a new head, runtime, explanation method or dataset layout is one entry, and the CLI runs it."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from mpoxscope.cli import main
from mpoxscope.registry import HEADS, register_head

# A tiny, fast recipe for training through the CLI on the synthetic images.
FAST = ["--split-file", "none", "--folds", "3", "--image-size", "64", "--epochs", "1", "--batch-size", "16",
        "--cache-views", "1", "--freeze", "--warmup-epochs", "0", "--tta", "none", "--quiet"]


@pytest.fixture
def toy_head():
    @register_head("toyhead", "toy head for the registry test: max pooling, linear classifier")
    class ToyHead(nn.Module):
        seen: dict = {}

        def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.0) -> None:
            super().__init__()
            ToyHead.seen = {"in_channels": in_channels, "dropout": dropout}
            self.num_classes = num_classes
            self.fc = nn.Linear(in_channels, num_classes)

        def forward(self, features: torch.Tensor, return_attention: bool = False):
            logits = self.fc(features.amax(dim=(2, 3)))
            return (logits, {}) if return_attention else logits

    yield ToyHead
    HEADS.remove("toyhead")


def test_toy_head_trains_through_the_cli(toy_head, synthetic_root, tmp_path, capsys):
    assert HEADS.get("toyhead").options == ("dropout",)  # AGFN's d_model, num_heads... are not passed
    run = tmp_path / "run"
    assert main(["train", str(synthetic_root), "--out", str(run), "--head", "toyhead", *FAST]) == 0
    assert toy_head.seen["dropout"] == pytest.approx(0.3)  # the ModelConfig option it asked for
    assert json.loads((run / "model.json").read_text())["model"]["head"] == "toyhead"
    assert "best epoch 1 of 1" in capsys.readouterr().out
    from mpoxscope.card.card import _head_line

    assert "max pooling" in _head_line("toyhead")


def test_unknown_head_is_a_usage_error(synthetic_root, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", str(synthetic_root), "--out", str(tmp_path / "r"), "--head", "nohead"])
    assert "agfn" in capsys.readouterr().err
