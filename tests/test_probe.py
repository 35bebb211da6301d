"""Linear probe (``solver="logistic"``): the folded scaler, the validation choice of C, and a probe run that every
consumer reads as an ordinary linear-head run."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from mpoxscope.config import ModelConfig, TrainConfig, preset
from mpoxscope.data.protocol import resolve_folds
from mpoxscope.data.samples import load_samples
from mpoxscope.engine import probe
from mpoxscope.engine.probe import check_probe, fit_logistic
from mpoxscope.errors import MpoxscopeError


def test_fit_logistic_folds_the_scaler_into_the_weights_and_picks_c_by_validation_loss():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    centres = rng.normal(scale=3, size=(3, 5))

    def sample(n):
        y = rng.integers(0, 3, n)
        x = centres[y][:, None, :] + rng.normal(size=(n, 2, 5)) * rng.uniform(0.5, 4, 5) + 10  # off-centre, scaled
        return x, y
    (tx, ty), (vx, vy) = sample(60), sample(40)
    fit = fit_logistic(tx, ty, vx, vy, n_classes=3, grid=(0.001, 1.0))
    ref = make_pipeline(StandardScaler(), LogisticRegression(C=fit.c, max_iter=5000, class_weight="balanced"))
    ref.fit(tx.reshape(-1, 5), np.repeat(ty, 2))
    rows = vx.reshape(-1, 5)
    np.testing.assert_allclose(rows @ fit.weight.T + fit.bias, ref.decision_function(rows), rtol=1e-4, atol=1e-4)
    assert fit.losses[str(fit.c)] == min(fit.losses.values()) and set(fit.losses) == {"0.001", "1.0"}


def test_fit_logistic_gives_the_same_weights_in_any_number_of_threads_and_restores_blas():
    """The C grid runs in threads with single-threaded BLAS: the fit must not depend on the thread count, and the
    process's BLAS threads must be what they were before (the limit is process-wide)."""
    from threadpoolctl import threadpool_info

    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 200)
    x = rng.normal(size=(200, 3, 64)) + y[:, None, None] * 0.3
    before = [d["num_threads"] for d in threadpool_info() if d["user_api"] == "blas"]
    one = fit_logistic(x[:150], y[:150], x[150:], y[150:], n_classes=4, n_jobs=1)
    many = fit_logistic(x[:150], y[:150], x[150:], y[150:], n_classes=4, n_jobs=3)
    assert [d["num_threads"] for d in threadpool_info() if d["user_api"] == "blas"] == before
    assert one.c == many.c and one.losses == many.losses and len(one.losses) == len(probe.C_GRID)
    np.testing.assert_array_equal(one.weight, many.weight)
    np.testing.assert_array_equal(one.bias, many.bias)


def test_fit_logistic_refuses_a_training_part_without_every_class():
    x = np.zeros((4, 1, 3))
    x[2:] = 1
    with pytest.raises(MpoxscopeError, match="2 of 3 classes"):
        fit_logistic(x, np.array([0, 0, 1, 1]), x, np.array([0, 0, 1, 1]), n_classes=3, grid=(1.0,))


def test_check_probe_wants_a_frozen_trunk_and_the_linear_head():
    m, t = preset("probe")
    check_probe(m, t)
    with pytest.raises(MpoxscopeError, match="--head linear"):
        check_probe(dataclasses.replace(m, head="agfn"), t)
    with pytest.raises(MpoxscopeError, match="--finetune 0"):
        check_probe(m, dataclasses.replace(t, trainable_stages=-1))


def test_probe_run_is_read_by_the_predictor_as_fitted(tmp_path, synthetic_root):
    """A fold's probe: one fit, validation scores that the Predictor reproduces, and a finished run that a rerun
    does not fit again."""
    from mpoxscope.data.images import load_image
    from mpoxscope.engine.checkpoint import read_meta
    from mpoxscope.engine.predict import Predictor
    from mpoxscope.engine.train import train

    data = load_samples(synthetic_root)
    fold = resolve_folds(data, None, n_folds=3)[0][0]
    model_cfg = ModelConfig(head="linear", image_size=96)
    train_cfg = dataclasses.replace(preset("probe")[1], device="cpu", refit=False)  # validation stays held out
    result = train(data, fold, model_cfg, train_cfg, tmp_path / "run", progress=False, log=lambda *_: None)
    meta = read_meta(tmp_path / "run")
    assert meta["probe"]["C"] in (0.001, 0.003, 0.01, 0.03, 0.1) and meta["tta"]["chosen_on"] == "validation"
    predictor = Predictor.from_run(tmp_path / "run", device="cpu")
    probs = predictor.predict_images([load_image(data.samples[i].path) for i in fold.validation])
    acc = float(np.mean(probs.argmax(1) == np.array([data.targets[i] for i in fold.validation])))
    assert abs(acc - result.validation["accuracy"]) < 1e-6
    from mpoxscope.card import build_card

    assert "linear probe: sklearn LogisticRegression" in build_card(meta)  # not "epochs 1, lr ..."
    logs: list[str] = []
    again = train(data, fold, model_cfg, train_cfg, tmp_path / "run", progress=False, log=logs.append)
    assert again.resumed and any("already trained" in line for line in logs)


def test_a_probe_member_in_a_cross_validated_ensemble(tmp_path, synthetic_root):
    """``BACKBONE@probe`` beside a gradient-trained member: both train, the ensemble is scored, and the probe's
    features are computed once for both folds (the second fold finds them in memory)."""
    from mpoxscope.config import DataConfig
    from mpoxscope.engine import probe
    from mpoxscope.engine.cv import CVConfig, cross_validate

    probe._FEATURES.clear()
    data_cfg = DataConfig(root=str(synthetic_root), split_file=None, folds=2)
    cfg = TrainConfig(epochs=1, batch_size=16, cache_views=2, warmup_epochs=1, tta="none", device="cpu",
                      ensemble=("tf_efficientnet_lite0@tiny", "tf_efficientnet_lite0@probe"))
    summary = cross_validate(data_cfg, ModelConfig(image_size=96, d_model=32, num_heads=4), cfg,
                             CVConfig(out=str(tmp_path / "cv")), progress=False, log=lambda *_: None)
    assert summary["summary"]["n_folds"] == 2
    member = tmp_path / "cv" / "fold2" / "run" / "members" / "tf_efficientnet_lite0-seed0-probe"
    assert (member / "best.safetensors").is_file()
    (store,) = probe._FEATURES.values()
    assert len(store) == len(load_samples(synthetic_root))  # every image once, over two folds


def test_fit_logistic_two_classes_gives_two_logits_with_sklearns_probabilities():
    from scipy.special import softmax
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 30)
    x = (y[:, None, None] + rng.normal(size=(30, 1, 4))).astype(np.float32)
    fit = fit_logistic(x, y, x, y, n_classes=2, grid=(0.3,))
    scaler = StandardScaler().fit(x[:, 0])
    ref = LogisticRegression(C=0.3, max_iter=5000, class_weight="balanced").fit(scaler.transform(x[:, 0]), y)
    np.testing.assert_allclose(softmax(x[:, 0] @ fit.weight.T + fit.bias, axis=1),
                               ref.predict_proba(scaler.transform(x[:, 0])), atol=1e-4)


def test_refit_keeps_every_validation_choice_and_refits_on_train_plus_validation(tmp_path, synthetic_root):
    """``--refit``: the same C, views, calibration, threshold and validation scores as the plain probe, new weights
    (those of a fit on training + validation), marked in model.json, the card and an evaluation of validation."""
    from safetensors.torch import load_file

    from mpoxscope.card import build_card
    from mpoxscope.engine.checkpoint import read_meta
    from mpoxscope.engine.train import train

    data = load_samples(synthetic_root)
    fold = resolve_folds(data, None, n_folds=3)[0][0]
    model_cfg = ModelConfig(head="linear", image_size=96)
    plain_cfg = dataclasses.replace(preset("probe")[1], device="cpu", refit=False)
    quiet = {"progress": False, "log": lambda *_: None}
    train(data, fold, model_cfg, plain_cfg, tmp_path / "plain", **quiet)
    train(data, fold, model_cfg, dataclasses.replace(plain_cfg, refit=True), tmp_path / "refit", **quiet)
    plain, refit = read_meta(tmp_path / "plain"), read_meta(tmp_path / "refit")
    for key in ("probe", "tta", "calibration", "validation", "screening"):
        assert plain[key] == refit[key], key
    assert "refit" not in plain and refit["refit"]["images"] == len(fold.train) + len(fold.validation)
    w_plain = load_file(str(tmp_path / "plain" / "best.safetensors"))["head.classifier.weight"]
    w_refit = load_file(str(tmp_path / "refit" / "best.safetensors"))["head.classifier.weight"]
    assert not np.allclose(w_plain.numpy(), w_refit.numpy(), atol=1e-4)
    rows = [*fold.train, *fold.validation]
    z = probe._FEATURES[(model_cfg.backbone, model_cfg.image_size, model_cfg.pretrained)]
    from mpoxscope.engine.probe import _file_key

    x = np.stack([z[_file_key(data.samples[i].path)].numpy() for i in rows])
    y = np.asarray(data.targets)[rows]
    direct = fit_logistic(x, y, x, y, len(data.classes), grid=(plain["probe"]["C"],))
    np.testing.assert_allclose(w_refit.numpy(), direct.weight, atol=1e-5)
    assert "Refit" in build_card(refit)
    from mpoxscope.engine.runner import evaluate_run

    m = evaluate_run(tmp_path / "refit", synthetic_root, tmp_path / "ev", split="validation", split_file="none",
                     device="cpu")
    assert "IN-SAMPLE" in m["protocol"]


def test_refit_is_refused_where_no_probe_is_trained():
    check_probe(ModelConfig(head="linear"), TrainConfig(solver="logistic", refit=True))
    check_probe(ModelConfig(), TrainConfig(ensemble=("tf_efficientnet_lite0", "tf_efficientnet_lite2@probe"),
                                           refit=True))
    with pytest.raises(MpoxscopeError, match="--refit refits linear probes"):
        check_probe(ModelConfig(), TrainConfig(refit=True))
    with pytest.raises(MpoxscopeError, match="this configuration refits none"):
        check_probe(ModelConfig(), TrainConfig(ensemble=("tf_efficientnet_lite0", "tf_efficientnet_lite2@frozen"),
                                               refit=True))


def test_a_refit_ensemble_is_calibrated_before_its_probe_is_refit(tmp_path, synthetic_root):
    """The ensemble's calibration and threshold are fitted before the refit and never again: a rerun (a resumed
    or repeated command) leaves them and the refit weights as they are."""
    from mpoxscope.engine.checkpoint import read_meta
    from mpoxscope.engine.ensemble import train_ensemble
    from mpoxscope.engine.rundir import weights_sha256

    data = load_samples(synthetic_root)
    fold = resolve_folds(data, None, n_folds=3)[0][0]
    specs = ("tf_efficientnet_lite0@tiny", "tf_efficientnet_lite0@probe")
    cfg = TrainConfig(epochs=1, batch_size=16, cache_views=2, warmup_epochs=1, tta="none", device="cpu",
                      ensemble=specs)
    model_cfg = ModelConfig(image_size=96, d_model=32, num_heads=4)
    quiet = {"progress": False, "log": lambda *_: None}
    train_ensemble(data, fold, model_cfg, cfg, specs, tmp_path / "plain", **quiet)
    train_ensemble(data, fold, model_cfg, dataclasses.replace(cfg, refit=True), specs, tmp_path / "refit", **quiet)
    plain, refit = read_meta(tmp_path / "plain"), read_meta(tmp_path / "refit")
    assert plain["calibration"] == refit["calibration"] and plain["screening"] == refit["screening"]
    assert refit["refit"]["members"] == ["tf_efficientnet_lite0-seed0-probe"]
    member = tmp_path / "refit" / "members" / "tf_efficientnet_lite0-seed0-probe"
    assert read_meta(member)["refit"]["images"] == len(fold.train) + len(fold.validation)
    assert weights_sha256(member) != weights_sha256(tmp_path / "plain" / "members" / member.name)
    before = weights_sha256(member)
    train_ensemble(data, fold, model_cfg, dataclasses.replace(cfg, refit=True), specs, tmp_path / "refit", **quiet)
    assert read_meta(tmp_path / "refit")["calibration"] == refit["calibration"] and weights_sha256(member) == before


def test_an_ensemble_is_never_calibrated_on_a_refit_member(tmp_path, synthetic_root):
    """A refit run's validation predictions are in-sample: ``mpoxscope ensemble`` refuses it as a member, and an
    ensemble trained with --refit is not calibrated again on its refit members by the same command without it."""
    from mpoxscope.engine.ensemble import assemble, train_ensemble
    from mpoxscope.engine.train import train

    data = load_samples(synthetic_root)
    fold = resolve_folds(data, None, n_folds=3)[0][0]
    model_cfg = ModelConfig(head="linear", image_size=96)
    quiet = {"progress": False, "log": lambda *_: None}
    probe_cfg = dataclasses.replace(preset("probe")[1], device="cpu")
    for name, refit in (("plain", False), ("refit", True)):
        train(data, fold, model_cfg, dataclasses.replace(probe_cfg, refit=refit), tmp_path / name, **quiet)
    with pytest.raises(MpoxscopeError, match="was refit on training \\+ validation"):
        assemble([tmp_path / "plain", tmp_path / "refit"], tmp_path / "ens", data_root=synthetic_root,
                 split_file="none", device="cpu", progress=False)
    specs = ("tf_efficientnet_lite0@probe/96", "tf_efficientnet_lite1@probe/96")
    cfg = TrainConfig(device="cpu", ensemble=specs, refit=True)
    train_ensemble(data, fold, model_cfg, cfg, specs, tmp_path / "ens2", **quiet)
    with pytest.raises(MpoxscopeError, match="an ensemble cannot be calibrated"):  # the same --out without --refit
        train_ensemble(data, fold, model_cfg, dataclasses.replace(cfg, refit=False), specs, tmp_path / "ens2",
                       **quiet)
