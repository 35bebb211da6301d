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
    model_cfg = ModelConfig(image_size=160)
    train_cfg = TrainConfig(epochs=15, cache_views=1, patience=15, tta="flips")
    result = train_fold(DataConfig(root=str(msld), fold="fold1"), model_cfg, train_cfg, tmp_path / "run",
                        progress=False)
    m = evaluate_run(result.run_dir, msld, tmp_path / "eval", split="test")
    assert "MSLD v2.0" in m["protocol"] and "fold1, test" in m["protocol"]
    assert m["n_images"] == 74
    # Chance is 1/6 and always answering the majority class (Mpox) scores 27/74 = 0.36 here; the frozen
    # preset measured 0.66-0.73 on this fold, and this cut-down one (160 px, one cached view, flip views: 64 s
    # instead of 112 s on a 2-core CPU without native bf16) 0.72. Require well above chance with margin for BLAS noise.
    assert m["accuracy"] >= 0.55, m
    assert m["f1_macro"] >= 0.45, m
    assert dataclasses.asdict(train_cfg)["cache_views"] == 1


@pytest.mark.realdata
def test_msld_end_to_end_finetune_few_steps(msld, tmp_path):
    """The default path (end to end on decoded images, TTA chosen on validation) runs on real photos: one epoch on
    a small patient-disjoint subset of fold 1 moves every stage's weights and stores a usable run."""
    import numpy as np
    import torch
    from safetensors.torch import load_file

    from mpoxscope.data.splits import Fold
    from mpoxscope.engine.predict import Predictor
    from mpoxscope.engine.train import train
    from mpoxscope.models import create_model

    prepared = prepare(DataConfig(root=str(msld), fold="fold1"))
    f = prepared.folds[0]
    fold = Fold("fold1", f.train[::12], f.validation[::8], f.test[:4])  # ~45 / ~18 images: a few steps
    cfg = TrainConfig(epochs=1, batch_size=16, trainable_stages=-1, cache_views=0, warmup_epochs=0, tta="auto")
    model_cfg = ModelConfig(image_size=128)
    train(prepared.data, fold, model_cfg, cfg, tmp_path / "run", prepared.info(fold), progress=False)
    fresh = create_model(model_cfg, 6).state_dict()
    last = load_file(str(tmp_path / "run" / "last.safetensors"))
    assert not torch.equal(last["backbone.conv_stem.weight"], fresh["backbone.conv_stem.weight"])
    probs = Predictor.from_run(tmp_path / "run", device="cpu").predict_paths(
        [prepared.data.samples[i].path for i in fold.test])
    assert all(np.isclose(sum(p.probabilities.values()), 1, atol=1e-4) for p in probs)



@pytest.mark.realdata
def test_msld_fold1_linear_probe(msld, tmp_path):
    """The probe preset on real photos (Lite0 at 128 px and a third of fold 1's training part, to keep it short):
    one logistic-regression fit on the frozen trunk's d4-view features, C chosen on validation, then the test part
    once through the Predictor."""
    import numpy as np

    from mpoxscope.config import preset
    from mpoxscope.data.splits import Fold
    from mpoxscope.engine.predict import Predictor
    from mpoxscope.engine.train import train

    prepared = prepare(DataConfig(root=str(msld), fold="fold1"))
    f = prepared.folds[0]
    fold = Fold("fold1", f.train[::3], f.validation[::2], f.test)
    model_cfg, train_cfg = preset("probe")
    model_cfg = dataclasses.replace(model_cfg, backbone="tf_efficientnet_lite0", image_size=128)
    train(prepared.data, fold, model_cfg, train_cfg, tmp_path / "run", prepared.info(fold), progress=False)
    probs = Predictor.from_run(tmp_path / "run", device="cpu").predict_paths(
        [prepared.data.samples[i].path for i in fold.test])
    names = prepared.data.classes
    right = [names.index(p.label) == prepared.data.targets[i] for p, i in zip(probs, fold.test)]
    # The full 260-px Lite2 probe scored 0.80 on this fold's 74 test images; answering the majority class, 0.36.
    assert np.mean(right) >= 0.5, np.mean(right)
