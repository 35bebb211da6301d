"""Shared fixtures: generated images, a small untrained run, and the real MSLD v2.0 folder when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mpoxscope.data.samples import msld_root


@pytest.fixture(autouse=True, scope="session")
def _threads():
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of many tiny ops (avoids OpenMP barrier stalls on a shared, busy CPU)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """Six classes x 12 generated images (64 px would be too small for the backbone; 128 px)."""
    from mpoxscope.data.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), images_per_class=12, image_size=128)


def make_run(run_dir: Path, backbone: str = "tf_efficientnet_lite0", head: str = "agfn", image_size: int = 128,
             classes: tuple[str, ...] = ("Mpox", "Chickenpox", "Measles", "Cowpox", "HFMD", "Healthy"),
             pretrained: str = "auto") -> Path:
    """Write an untrained (pretrained backbone, random head) run directory, as ``train`` would lay it out."""
    from mpoxscope.config import ModelConfig
    from mpoxscope.engine.checkpoint import build_meta, save_weights, write_meta
    from mpoxscope.models import create_model

    torch.manual_seed(0)
    cfg = ModelConfig(backbone=backbone, head=head, image_size=image_size, d_model=64, num_heads=4,
                      pretrained=pretrained)
    model = create_model(cfg, len(classes)).eval()
    run_dir.mkdir(parents=True, exist_ok=True)
    save_weights(model, run_dir / "best.safetensors")
    save_weights(model, run_dir / "last.safetensors")
    write_meta(run_dir, build_meta(model, list(classes), note="untrained test fixture"))
    return run_dir


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """An untrained EfficientNet-Lite0 + AGFN run at 128 px."""
    return make_run(tmp_path_factory.mktemp("run") / "tiny")


@pytest.fixture(scope="session")
def msld() -> Path:
    """The real MSLD v2.0 folder; tests that need it are skipped when it is absent."""
    root = msld_root()
    if not (root / "images").is_dir():
        pytest.skip(f"MSLD v2.0 not found at {root} (set MPOXSCOPE_MSLD)")
    return root
