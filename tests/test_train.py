"""Training engine: the cached fast path learns, runs resume after interruption, bad images stop or are skipped."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from mpoxscope.config import ModelConfig, TrainConfig
from mpoxscope.data.protocol import resolve_folds
from mpoxscope.data.samples import load_samples
from mpoxscope.engine import rundir
from mpoxscope.engine.checkpoint import load_model, read_meta
from mpoxscope.engine.predict import Predictor
from mpoxscope.engine.train import class_weights, cosine_with_warmup, train
from mpoxscope.errors import MpoxscopeError

SMALL = ModelConfig(image_size=96, d_model=32, num_heads=4)
FAST = TrainConfig(epochs=4, batch_size=16, cache_views=2, warmup_epochs=1, lr=3e-3, patience=10)


@pytest.fixture(scope="module")
def data_and_fold(synthetic_root):
    data = load_samples(synthetic_root)
    folds, _ = resolve_folds(data, None, n_folds=3)
    return data, folds[0]


def test_class_weights_balanced():
    w = class_weights(np.array([0, 0, 0, 1]), 3)
    assert w[1] > w[0] and w[2] == 1.0


def test_cosine_with_warmup_shape():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = cosine_with_warmup(opt, warmup_steps=2, total_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] < lrs[1] <= 1.0 and lrs[-1] < 0.1


def test_cached_training_learns_and_checkpoints_round_trip(tmp_path, data_and_fold):
    data, fold = data_and_fold
    cfg = dataclasses.replace(FAST, epochs=8)
    result = train(data, fold, SMALL, cfg, tmp_path / "run", {"dataset": "synthetic"}, progress=False)
    assert result.validation["f1_macro"] > 0.5  # six classes: chance is about 0.17
    meta = read_meta(tmp_path / "run")
    assert meta["classes"] == data.classes and meta["model"]["backbone"] == "tf_efficientnet_lite0"
    assert meta["trainable_stages_resolved"]["cached"] is True
    assert "temperature" in meta["calibration"]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, result.epochs_run + 1))
    # best.safetensors reproduces the validation result through the image path (no cache involved)
    predictor = Predictor.from_run(tmp_path / "run", device="cpu")
    from mpoxscope.data.images import load_image

    imgs = [load_image(data.samples[i].path) for i in fold.validation]
    preds = predictor.predict_images(imgs).argmax(1)
    acc = float(np.mean(preds == np.array([data.targets[i] for i in fold.validation])))
    assert abs(acc - result.validation["accuracy"]) < 1e-6
    again = train(data, fold, SMALL, cfg, tmp_path / "run", {"dataset": "synthetic"}, progress=False)
    assert again.resumed and again.best_epoch == result.best_epoch  # finished runs are not retrained


def test_interrupted_run_resumes(tmp_path, data_and_fold, monkeypatch):
    data, fold = data_and_fold
    real_write_json = rundir.write_json

    def interrupt_after_epoch_2(path, obj):
        real_write_json(path, obj)
        if obj.get("status") == "running" and obj.get("epochs_run") == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(rundir, "write_json", interrupt_after_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train(data, fold, SMALL, FAST, tmp_path / "run", progress=False)
    monkeypatch.setattr(rundir, "write_json", real_write_json)
    assert (tmp_path / "run" / "last.safetensors").is_file() and (tmp_path / "run" / "resume.pt").is_file()
    logs = []
    result = train(data, fold, SMALL, FAST, tmp_path / "run", progress=False, log=logs.append)
    assert any("resuming" in line and "epoch 2" in line for line in logs)
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3, 4] and result.epochs_run == 4
    with pytest.raises(MpoxscopeError, match="another configuration"):
        train(data, fold, SMALL, dataclasses.replace(FAST, lr=1.0), tmp_path / "run", progress=False)


def test_unreadable_image_stops_before_training_or_is_skipped(tmp_path, synthetic_root):
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    victim = sorted((root / "Mpox").iterdir())[0]
    victim.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    data = load_samples(root)
    fold = resolve_folds(data, None, n_folds=3)[0][0]
    with pytest.raises(MpoxscopeError, match=victim.name):
        train(data, fold, SMALL, FAST, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # nothing was started
    cfg = dataclasses.replace(FAST, epochs=1, skip_bad_images=True)
    result = train(data, fold, SMALL, cfg, tmp_path / "run2", progress=False)
    assert len(result.skipped_files) == 1 and victim.name in result.skipped_files[0]
    assert read_meta(tmp_path / "run2")["skipped_files"] == result.skipped_files


@pytest.mark.parametrize("stages,views", [(2, 2), (-1, 0)])
def test_finetune_paths_update_backbone(tmp_path, data_and_fold, stages, views):
    """Partial fine-tuning on cached trunk outputs, and end-to-end training on images, change backbone weights."""
    data, fold = data_and_fold
    cfg = dataclasses.replace(FAST, epochs=1, trainable_stages=stages, cache_views=views, batch_size=8)
    train(data, fold, SMALL, cfg, tmp_path / "run", progress=False)
    model, meta = load_model(tmp_path / "run", which="last")
    from mpoxscope.models import create_model

    fresh = create_model(SMALL, len(data.classes))
    last_stage_changed = not torch.equal(model.stages[-1][0].weight, fresh.stages[-1][0].weight)
    first_stage_changed = not torch.equal(model.stages[0][0].weight, fresh.stages[0][0].weight)
    assert last_stage_changed
    assert first_stage_changed == (stages == -1)
    assert meta["trainable_stages_resolved"]["cached"] == (views > 0)


def test_a_run_from_a_version_without_a_newer_setting_is_still_the_same_run():
    """Settings added later (with the default that reproduces the old behaviour) do not orphan older runs."""
    from mpoxscope.engine.train import same_settings

    defaults = {"lr": 0.001, "tta": "auto", "augment": {"hflip": True, "hue": 0.0}}
    now = {"lr": 0.001, "tta": "auto", "augment": {"hflip": True, "hue": 0.0}}
    older = {"lr": 0.001, "augment": {"hflip": True}}  # written before "tta" and "hue" existed
    assert same_settings(older, now, defaults)
    assert not same_settings(older, {**now, "tta": "d4"}, defaults)  # asking for a non-default new setting
    assert not same_settings(older, {**now, "augment": {"hflip": True, "hue": 0.1}}, defaults)
    assert not same_settings({**older, "lr": 0.01}, now, defaults)  # an old setting that differs
    assert not same_settings({**now, "gone": 1}, now, defaults)  # a setting this version does not know
    assert not same_settings(None, now, defaults)
