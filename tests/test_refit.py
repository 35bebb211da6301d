"""``--refit-trained``: a trained (AdamW) run retrained on training + validation for the epoch count validation
chose, every validation choice kept; resumable to the same weights; in an ensemble, after its calibration."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
from safetensors.torch import load_file

from mpoxscope.config import ModelConfig, TrainConfig
from mpoxscope.data.protocol import resolve_folds
from mpoxscope.data.samples import load_samples
from mpoxscope.engine import rundir
from mpoxscope.engine.checkpoint import read_meta
from mpoxscope.engine.rundir import weights_sha256
from mpoxscope.engine.train import train
from mpoxscope.errors import MpoxscopeError
from mpoxscope.fileio import read_json, write_json

SMALL = ModelConfig(image_size=96, d_model=32, num_heads=4)
#: end to end on decoded images (the default member's path), three epochs
E2E = TrainConfig(epochs=3, batch_size=16, cache_views=0, warmup_epochs=1, patience=10, tta="none", device="cpu",
                  precision="fp32")
QUIET = {"progress": False, "log": lambda *_: None}


@pytest.fixture(scope="module")
def data_and_fold(synthetic_root):
    data = load_samples(synthetic_root)
    return data, resolve_folds(data, None, n_folds=3)[0][0]


def _trained_copies(tmp_path, data, fold, names, best_epoch=None):
    """One trained run copied to each of ``names`` (training need not be bitwise repeatable; the refit is
    compared on the same trained run). ``best_epoch``: the epoch count the refit is told validation chose."""
    train(data, fold, SMALL, E2E, tmp_path / "base", **QUIET)
    if best_epoch is not None:
        state = read_json(tmp_path / "base" / rundir.STATE)
        write_json(tmp_path / "base" / rundir.STATE, {**state, "best_epoch": best_epoch})
    for name in names:
        shutil.copytree(tmp_path / "base", tmp_path / name)


def test_refit_trained_keeps_every_validation_choice_and_retrains_for_the_chosen_epochs(tmp_path, data_and_fold):
    from mpoxscope.card import build_card
    from mpoxscope.engine.refit import refit_trained

    data, fold = data_and_fold
    _trained_copies(tmp_path, data, fold, ["refit"])
    block = refit_trained(tmp_path / "refit", data, fold, SMALL, E2E, log=lambda *_: None)
    plain, refit = read_meta(tmp_path / "base"), read_meta(tmp_path / "refit")
    for key in ("tta", "calibration", "validation", "screening"):
        assert plain[key] == refit[key], key
    best = read_json(tmp_path / "base" / rundir.STATE)["best_epoch"]
    assert refit["refit"] == block and block["epochs"] == best and block["of_epochs"] == 3
    assert block["images"] == len(fold.train) + len(fold.validation)
    history = (tmp_path / "refit" / "refit" / rundir.METRICS).read_text().splitlines()
    assert len(history) == best  # stopped after the chosen epoch
    assert weights_sha256(tmp_path / "refit") != weights_sha256(tmp_path / "base")
    assert "retrained for" in build_card(refit)
    # through train(): the refit follows the finish, once; a rerun changes nothing
    cfg = dataclasses.replace(E2E, refit=True, refit_trained=True)
    result = train(data, fold, SMALL, cfg, tmp_path / "via_train", **QUIET)
    assert read_meta(tmp_path / "via_train")["refit"]["epochs"] == result.best_epoch
    before = weights_sha256(tmp_path / "via_train")
    again = train(data, fold, SMALL, cfg, tmp_path / "via_train", **QUIET)
    assert again.resumed and weights_sha256(tmp_path / "via_train") == before


def test_an_interrupted_refit_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path, data_and_fold, monkeypatch):
    from mpoxscope.engine.refit import refit_trained

    data, fold = data_and_fold
    _trained_copies(tmp_path, data, fold, ["whole", "killed"], best_epoch=2)
    refit_trained(tmp_path / "whole", data, fold, SMALL, E2E, log=lambda *_: None)
    real = rundir.commit_epoch

    def killed_after_refit_epoch_1(run_dir, *args, **kwargs):
        real(run_dir, *args, **kwargs)
        if args[-1].epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(rundir, "commit_epoch", killed_after_refit_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        refit_trained(tmp_path / "killed", data, fold, SMALL, E2E, log=lambda *_: None)
    monkeypatch.setattr(rundir, "commit_epoch", real)
    assert "refit" not in read_meta(tmp_path / "killed")
    logs = []
    refit_trained(tmp_path / "killed", data, fold, SMALL, E2E, log=logs.append)
    assert any("resuming" in line and "epoch 1" in line for line in logs)
    # as training's own resume test: equal up to float noise (CPU kernels need not be bitwise repeatable)
    whole, killed = (load_file(str(tmp_path / d / rundir.BEST)) for d in ("whole", "killed"))
    assert max(float((whole[k] - killed[k]).abs().max()) for k in whole) < 1e-6


def test_refit_trained_needs_refit_and_one_process():
    from mpoxscope.engine.probe import check_probe

    check_probe(ModelConfig(), TrainConfig(refit=True, refit_trained=True))  # any run can be retrained
    with pytest.raises(MpoxscopeError, match="--refit-trained needs --refit"):
        check_probe(ModelConfig(), TrainConfig(refit=False, refit_trained=True))


def test_refit_trained_flag_implies_refit():
    import argparse

    from mpoxscope.engine.cli import add_model_options, configs_from_args

    p = argparse.ArgumentParser()
    add_model_options(p)
    _, cfg = configs_from_args(p.parse_args(["--refit-trained"]))
    assert cfg.refit and cfg.refit_trained
    _, cfg = configs_from_args(p.parse_args(["--refit-trained", "--no-refit"]))
    assert cfg.refit_trained and not cfg.refit  # refused by check_probe, as tested above


def test_an_ensemble_retrains_its_members_after_its_calibration(tmp_path, data_and_fold):
    from mpoxscope.engine.ensemble import train_ensemble

    data, fold = data_and_fold
    specs = ("tf_efficientnet_lite0@tiny", "tf_efficientnet_lite0@probe")
    cfg = TrainConfig(epochs=2, batch_size=16, cache_views=2, warmup_epochs=1, tta="none", device="cpu",
                      ensemble=specs)
    small = ModelConfig(image_size=96, d_model=32, num_heads=4)
    train_ensemble(data, fold, small, cfg, specs, tmp_path / "plain", **QUIET)
    shutil.copytree(tmp_path / "plain", tmp_path / "refit")  # members reused, the ensemble recombined, then refit
    refit_cfg = dataclasses.replace(cfg, refit=True, refit_trained=True)
    train_ensemble(data, fold, small, refit_cfg, specs, tmp_path / "refit", **QUIET)
    plain, refit = read_meta(tmp_path / "plain"), read_meta(tmp_path / "refit")
    assert plain["calibration"] == refit["calibration"] and plain["screening"] == refit["screening"]
    names = ["tf_efficientnet_lite0-seed0-tiny", "tf_efficientnet_lite0-seed0-probe"]
    assert refit["refit"]["members"] == names
    trained = tmp_path / "refit" / "members" / names[0]
    assert read_meta(trained)["refit"]["epochs"] >= 1
    assert weights_sha256(trained) != weights_sha256(tmp_path / "plain" / "members" / names[0])
    before = weights_sha256(trained)
    train_ensemble(data, fold, small, refit_cfg, specs, tmp_path / "refit", **QUIET)
    assert weights_sha256(trained) == before and read_meta(tmp_path / "refit")["calibration"] == refit["calibration"]


def test_a_member_that_says_refit_no_is_left_as_validation_chose_it(tmp_path, data_and_fold):
    """``--refit-trained`` retrains every trained member except one whose spec says ``refit=no``: its weights are
    those of the same member in an ensemble that was never refit; the other member's are not."""
    from mpoxscope.engine.ensemble import train_ensemble

    data, fold = data_and_fold
    specs = ("tf_efficientnet_lite0", "tf_efficientnet_lite0:1,epochs=1,refit=no")
    cfg = dataclasses.replace(E2E, epochs=1, ensemble=specs)
    train_ensemble(data, fold, SMALL, cfg, specs, tmp_path / "plain", **QUIET)
    # the same trained members (training need not be bitwise repeatable), then the refit
    shutil.copytree(tmp_path / "plain", tmp_path / "refit")
    refit_cfg = dataclasses.replace(cfg, refit=True, refit_trained=True)
    train_ensemble(data, fold, SMALL, refit_cfg, specs, tmp_path / "refit", **QUIET)
    kept, refit = "tf_efficientnet_lite0-seed1-1ep-norefit", "tf_efficientnet_lite0-seed0"
    assert read_meta(tmp_path / "refit")["refit"]["members"] == [refit]
    members = {name: [weights_sha256(tmp_path / run / "members" / name) for run in ("plain", "refit")]
               for name in (kept, refit)}
    assert members[kept][0] == members[kept][1] and "refit" not in read_meta(tmp_path / "refit" / "members" / kept)
    assert members[refit][0] != members[refit][1]
    with pytest.raises(MpoxscopeError, match="refits none"):
        from mpoxscope.engine.probe import check_probe

        check_probe(SMALL, dataclasses.replace(refit_cfg, ensemble=(specs[1],)))


def test_reports_name_the_members_a_refit_retrains_when_a_member_says_refit_no():
    from mpoxscope.config import preset
    from mpoxscope.engine.cv import _refit_words
    from mpoxscope.engine.ensemble import describe_training

    m, t = preset("default")
    assert describe_training(m, t).endswith("; every member refit on training + validation after every validation "
                                            "choice")
    three = dataclasses.replace(t, ensemble=(*t.ensemble, "tf_efficientnet_lite2/260,epochs=10,refit=no"))
    kept = "tf_efficientnet_lite0 + tf_efficientnet_lite2@probe/260 refit on training + validation"
    assert kept in describe_training(m, three) and kept in _refit_words(m, three)
    assert "every" not in _refit_words(m, three) and "every model" in _refit_words(m, t)


def test_a_refit_trains_in_the_precision_its_epochs_were_chosen_in(tmp_path, data_and_fold, monkeypatch):
    """A run trained where `--precision auto` meant bf16, refit where it means fp32: the retraining runs in bf16
    too (the chosen epoch count belongs to that precision), and says so."""
    from mpoxscope.engine import device as dev
    from mpoxscope.engine.refit import refit_trained

    data, fold = data_and_fold
    cfg = dataclasses.replace(E2E, epochs=2, precision="auto")
    monkeypatch.setattr(dev, "cpu_supports_bf16", lambda: True)
    train(data, fold, SMALL, cfg, tmp_path / "run", **QUIET)
    monkeypatch.setattr(dev, "cpu_supports_bf16", lambda: False)
    refit_trained(tmp_path / "run", data, fold, SMALL, cfg, log=lambda *_: None)
    assert read_meta(tmp_path / "run" / "refit")["trainable_stages_resolved"]["precision"] == "bf16"
