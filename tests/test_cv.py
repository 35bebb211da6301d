"""Cross-validation: every fold trained and tested, summary statistics, resume, and the leak-free variant."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from mpoxscope.config import DataConfig, ModelConfig, TrainConfig
from mpoxscope.engine.checkpoint import read_meta
from mpoxscope.engine.cv import CVConfig, cross_validate, summarize
from mpoxscope.errors import MpoxscopeError

SMALL = ModelConfig(image_size=96, d_model=32, num_heads=4)
FAST = TrainConfig(epochs=3, batch_size=16, cache_views=2, warmup_epochs=1, lr=3e-3)


def test_summarize_mean_std_and_pooled_confusion():
    def fold(acc, cm):
        return {"accuracy": acc, "precision_macro": acc, "recall_macro": acc, "f1_macro": acc, "f1_weighted": acc,
                "roc_auc_ovr_macro": None, "n_images": int(np.sum(cm)), "confusion_matrix": cm,
                "per_class": {"A": {"f1": acc, "support": 1}, "B": {"f1": 1.0, "support": 0}}}

    s = summarize([fold(0.5, [[1, 1], [0, 0]]), fold(1.0, [[2, 0], [0, 0]])], ["A", "B"])
    assert s["accuracy"]["mean"] == pytest.approx(0.75)
    assert s["accuracy"]["std"] == pytest.approx(np.std([0.5, 1.0], ddof=1))
    assert s["roc_auc_ovr_macro"]["mean"] is None
    assert s["per_class_f1"]["B"]["values"] == []  # absent from every test part: not averaged as 1.0
    assert s["pooled_confusion_matrix"] == [[3, 1], [0, 0]]


def test_cv_runs_resumes_and_reports_leak_free(tmp_path, synthetic_root):
    data_cfg = DataConfig(root=str(synthetic_root), split_file=None, folds=3)
    dropped = {}

    def drop_two(prepared, fold):
        dropped[fold.name] = set(fold.test[:2])
        return dropped[fold.name]

    cv = CVConfig(out=str(tmp_path / "cv"), exclude_leaks=True)
    summary = cross_validate(data_cfg, SMALL, FAST, cv, leak_filter=drop_two, progress=False, log=lambda *_: None)
    assert summary["summary"]["n_folds"] == 3
    assert summary["summary"]["n_test_images_total"] == 72  # grouped k-fold: the test parts cover every image
    assert 0 <= summary["summary"]["accuracy"]["mean"] <= 1
    assert "grouped stratified 3-fold" in summary["protocol"]
    for full, lf in zip(summary["per_fold"], summary["leak_free"]["per_fold"]):
        assert lf["n_images"] == full["n_images"] - 2 and lf["n_dropped"] == 2
    report = (tmp_path / "cv" / "cv_report.md").read_text()
    assert "Leak-free variant" in report and "| fold3 |" in report
    assert (tmp_path / "cv" / "per_fold.png").stat().st_size > 1000
    # issue 9: pooled patient-bootstrap CIs and test ECE in the summary and the report
    u = summary["uncertainty"]
    assert u["pooled"]["n"] == summary["summary"]["n_test_images_total"]
    assert "patients" in u["pooled"]["ci"]["method"] and 0 <= u["pooled"]["ece"] <= 1
    acc = u["pooled"]["ci"]["accuracy"]
    assert f"{100 * acc['value']:.1f} [{100 * acc['low']:.1f}, {100 * acc['high']:.1f}]" in report
    assert (tmp_path / "cv" / "reliability.png").is_file() and "pooled_validation_temperature" in u
    _assert_validation_reused_and_exact(tmp_path / "cv", data_cfg, "fold2")

    # resume: fold1 and fold2 are skipped; fold3 is re-evaluated from its finished run without retraining
    (tmp_path / "cv" / "fold3" / "evaluation" / "metrics.json").unlink()
    logs: list[str] = []
    again = cross_validate(data_cfg, SMALL, FAST, cv, leak_filter=drop_two, progress=False, log=logs.append)
    assert any("fold1: already evaluated" in line for line in logs)
    assert any("already trained" in line for line in logs)
    assert again["per_fold"][2]["accuracy"] == summary["per_fold"][2]["accuracy"]
    saved = json.loads((tmp_path / "cv" / "cv_summary.json").read_text())
    assert saved["summary"]["accuracy"]["mean"] == pytest.approx(summary["summary"]["accuracy"]["mean"])
    # the rerun's clock is not the cv's: the report says which folds an earlier command paid for
    assert summary["reused_folds"] == [] and saved["reused_folds"] == ["fold1", "fold2"]
    assert "2 of 3 folds reused from an earlier command" in (tmp_path / "cv" / "cv_report.md").read_text()
    # a finished fold of another configuration is never reported under this one: its run refuses to be reused
    with pytest.raises(MpoxscopeError, match="another configuration"):
        cross_validate(data_cfg, SMALL, dataclasses.replace(FAST, lr=1.0), cv, progress=False, log=lambda *_: None)
    # the same --out with another split (4 folds: fold1 holds other images) never reuses fold1's run or numbers
    other = DataConfig(root=str(synthetic_root), split_file=None, folds=4)
    with pytest.raises(MpoxscopeError, match="another configuration"):
        cross_validate(other, SMALL, FAST, cv, leak_filter=drop_two, progress=False, log=lambda *_: None)
    # another leak filter (e.g. --near-dup-threshold) leaves out other images: the leak-free score is recomputed

    def drop_three(prepared, fold):
        return set(fold.test[:3])

    third = cross_validate(data_cfg, SMALL, FAST, cv, leak_filter=drop_three, progress=False, log=lambda *_: None)
    assert [lf["n_dropped"] for lf in third["leak_free"]["per_fold"]] == [3, 3, 3]


def test_cv_ensemble_with_a_frozen_member_shares_its_feature_cache(tmp_path, synthetic_root, monkeypatch):
    """An end-to-end member plus a frozen-trunk member (@frozen): the frozen member's trunk outputs are computed
    once for all folds, not once per fold."""
    from mpoxscope.engine import features

    calls = []
    real = features.build_feature_bank
    monkeypatch.setattr(features, "build_feature_bank", lambda *a, **k: calls.append(1) or real(*a, **k))
    data_cfg = DataConfig(root=str(synthetic_root), split_file=None, folds=2)
    e2e = dataclasses.replace(FAST, epochs=1, trainable_stages=-1, cache_views=0, tta="none",
                              ensemble=("tf_efficientnet_lite0", "tf_efficientnet_lite0:1@tiny/112"))
    summary = cross_validate(data_cfg, SMALL, e2e, CVConfig(out=str(tmp_path / "cv")), progress=False,
                             log=lambda *_: None)
    assert summary["summary"]["n_folds"] == 2 and len(calls) == 1
    report = (tmp_path / "cv" / "cv_report.md").read_text()
    # the summary names the size the ensemble reads (its /112 member's), not the shared recipe's 96 px
    assert summary["input_size"] == 112
    assert ("**Model:** ensemble of tf_efficientnet_lite0 + tf_efficientnet_lite0:1@tiny/112 (agfn heads, input "
            "112 px; members without /PX read 96 px") in report
    _assert_validation_reused_and_exact(tmp_path / "cv", data_cfg)
    assert (tmp_path / "cv" / "tf_efficientnet_lite0-seed1-tiny-112px.feature_cache.safetensors").is_file()
    assert (tmp_path / "cv" / "fold2" / "run" / "members" / "tf_efficientnet_lite0-seed1-tiny-112px" /
            "model.json").is_file()
    # the same out with --refit-trained: members reused, the ensemble recombined, refit and evaluated again
    refit = cross_validate(data_cfg, SMALL, dataclasses.replace(e2e, refit=True, refit_trained=True),
                           CVConfig(out=str(tmp_path / "cv")), progress=False, log=lambda *_: None)
    assert refit["reused_folds"] == [] and "--refit-trained" in refit["protocol"]
    assert read_meta(tmp_path / "cv" / "fold1" / "run")["refit"]["members"] == [
        "tf_efficientnet_lite0-seed0", "tf_efficientnet_lite0-seed1-tiny-112px"]
    # where each fold's time went: every member's training and the trained member's refit, inside 'training'
    phases = refit["per_fold"][0]["phases_s"]
    assert {"training", "evaluation", "train tf_efficientnet_lite0-seed0", "refit tf_efficientnet_lite0-seed0",
            "train tf_efficientnet_lite0-seed1-tiny-112px"} <= set(phases)
    assert all(v >= 0 for v in phases.values())
    assert "## Where the time went" in (tmp_path / "cv" / "cv_report.md").read_text()


def _assert_validation_reused_and_exact(cv_dir, data_cfg, fold="fold1"):
    """cv's validation predictions come from the run (no second scoring) and equal the Predictor's own."""
    from mpoxscope.engine.evaluate import predict_split
    from mpoxscope.engine.finish import load_validation_probs
    from mpoxscope.engine.predict import Predictor
    from mpoxscope.engine.runner import prepare
    from mpoxscope.engine.screening import read_predictions_csv

    assert (cv_dir / fold / "run" / "validation_probs.npz").is_file()
    prepared = prepare(data_cfg, 0)
    f = next(x for x in prepared.folds if x.name == fold)
    predictor = Predictor.from_run(cv_dir / fold / "run", device="cpu")
    probs, _, names, _ = predict_split(predictor, prepared.data, f.validation)
    assert load_validation_probs(predictor.run_dir, names, predictor.meta) is not None  # what cv used
    saved, _ = read_predictions_csv(cv_dir / fold / "validation" / "predictions.csv")
    assert saved.names == names
    np.testing.assert_allclose(saved.probs, probs, atol=1e-5)


def test_feature_cache_reports_progress_outside_a_terminal(synthetic_root, capsys):
    """A frozen-trunk feature cache takes many minutes on MSLD: in a log file it must still say how far it is."""
    import torch

    from mpoxscope.data.samples import load_samples
    from mpoxscope.data.transforms import AugmentConfig
    from mpoxscope.engine.features import build_feature_bank
    from mpoxscope.models import create_model

    data = load_samples(synthetic_root)
    model = create_model(ModelConfig(image_size=64, d_model=32, num_heads=2, pretrained="none"), len(data.classes))
    bank = build_feature_bank(model, model.trunk_stop(0), data, range(4), 1, 0, AugmentConfig(), torch.device("cpu"))
    err = capsys.readouterr().err
    assert "caching features: done 8/8 img" in err and bank.covers(range(4))


def test_only_folds_naming_no_fold_fails_in_one_line_before_any_file(tmp_path, synthetic_root, capsys):
    from mpoxscope.cli import main

    out = tmp_path / "cv"
    assert main(["cv", str(synthetic_root), "--out", str(out), "--split-file", "none", "--folds", "3",
                 "--only-folds", "9", "--preset", "tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--only-folds: no fold fold9" in err and "available: fold1, fold2, fold3" in err
    assert len(err.splitlines()) == 1 and not out.exists()
