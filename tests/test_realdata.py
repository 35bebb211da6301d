"""End to end on the real MSLD v2.0 (official fold 1): the frozen-backbone fast path must beat chance by far.

Skipped when the data is absent (set MPOXSCOPE_MSLD). Images are read from the shared folder, never copied.
"""

from __future__ import annotations

import dataclasses

import pytest

from mpoxscope.config import DataConfig, ModelConfig, TrainConfig
from mpoxscope.engine.runner import evaluate_run, prepare, train_fold


@pytest.mark.realdata
def test_official_split_is_patient_disjoint(msld):
    prepared = prepare(DataConfig(root=str(msld)))
    assert prepared.split_source == "split file folds.csv"
    assert [len(f.test) for f in prepared.folds] == [74, 82, 64, 81, 63]
    assert len(prepared.data) == 755 and len(prepared.data.classes) == 6


@pytest.mark.realdata
@pytest.mark.slow
def test_msld_fold1_frozen_fast_path(msld, tmp_path):
    model_cfg = ModelConfig(image_size=192)
    train_cfg = TrainConfig(epochs=15, cache_views=2, patience=15)
    result = train_fold(DataConfig(root=str(msld), fold="fold1"), model_cfg, train_cfg, tmp_path / "run",
                        progress=False)
    m = evaluate_run(result.run_dir, msld, tmp_path / "eval", split="test")
    assert "MSLD v2.0" in m["protocol"] and "fold1, test" in m["protocol"]
    assert m["n_images"] == 74
    # Chance is 1/6 and always answering the majority class (Mpox) scores 27/74 = 0.36 here; the default
    # configuration measured 0.66-0.73 on this fold. Require well above chance with margin for BLAS noise.
    assert m["accuracy"] >= 0.55, m
    assert m["f1_macro"] >= 0.45, m
    assert dataclasses.asdict(train_cfg)["cache_views"] == 2
