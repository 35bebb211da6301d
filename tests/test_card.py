"""Model cards render from whatever a run records, and say "not recorded" for the rest."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mpoxscope.card import DISCLAIMER, build_card, count_parameters, write_card
from mpoxscope.card import cli as card_cli
from mpoxscope.engine.calibration import calibrate
from mpoxscope.engine.checkpoint import load_model, read_meta, write_meta
from mpoxscope.errors import MpoxscopeError


@pytest.fixture
def run(tiny_run, tmp_path) -> Path:
    """A private copy of the tiny run (the card is written into it)."""
    return Path(shutil.copytree(tiny_run, tmp_path / "fold1", ignore=shutil.ignore_patterns("*.onnx")))


def _calibration_block() -> dict:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 1, (120, 6))
    y = rng.integers(0, 6, 120)
    logits[np.arange(120), y] += 3.0
    return calibrate(logits * 2.0, y)


def test_card_without_metrics_or_calibration(run, capsys):
    parser = argparse.ArgumentParser()
    card_cli.register(parser.add_subparsers())
    args = parser.parse_args(["card", str(run)])
    assert args.handler(args) == 0
    assert "MODEL_CARD.md" in capsys.readouterr().out
    text = (run / "MODEL_CARD.md").read_text()
    assert DISCLAIMER in text and "not a medical device" in text
    assert "Held-out test metrics: not recorded" in text
    assert "Calibration: not recorded" in text
    assert "tf_efficientnet_lite0" in text and "agfn" in text and "128 x 128 px" in text
    assert "CC BY-NC" in text and "106742" in text and "Biomedical Signal Processing and Control" in text
    assert "Skin-tone coverage is limited" in text and "Web-scraped" in text


def test_parameter_count_matches_model(run):
    model, _ = load_model(run)
    assert count_parameters(run / "best.safetensors") == sum(p.numel() for p in model.parameters())
    assert count_parameters(run / "missing.safetensors") is None


def test_card_with_metrics_calibration_and_audit(run, tmp_path):
    meta = read_meta(run)
    meta["calibration"] = _calibration_block()
    meta["data"] = {"root": "../shared/data/msld_v2", "split": "folds.csv", "fold": "fold1",
                    "counts": {"train": 537, "validation": 144, "test": 74}}
    meta["train"] = {"epochs": 30, "lr": 0.001, "trainable_stages": 0}
    write_meta(run, meta)
    (run / "evaluation").mkdir()
    metrics = {"split": "test", "weights": "best", "n": 74, "accuracy": 0.8108,
               "macro_f1": {"value": 0.7712, "low": 0.69, "high": 0.85, "level": 0.95},
               "per_class": {c: {"precision": 0.9, "recall": 0.8, "f1": 0.85, "support": 12}
                             for c in meta["classes"]},
               "confusion_matrix": np.diag([10, 5, 4, 3, 8, 9]).tolist(), "notes": None}
    (run / "evaluation" / "metrics.json").write_text(json.dumps(metrics))
    audit = tmp_path / "audit.json"
    audit.write_text(json.dumps({"cross_split_duplicates": [{"a": "MKP_01_01.jpg", "b": "MKP_02_01.jpg"}],
                                 "exact_duplicates": 2}))
    out = write_card(run, tmp_path / "card.md", audit_file=audit)  # metrics found in RUN/evaluation
    text = out.read_text()
    cal = meta["calibration"]
    assert f"{cal['temperature']:.4f}" in text and f"{cal['ece_after']:.4f}" in text
    assert f"{cal['abstain_threshold']:.4f}" in text and "Coverage (share kept)" in text
    assert "| accuracy | 0.8108 |" in text and "0.7712 (95% CI 0.6900–0.8500)" in text
    assert "| true \\ predicted | Mpox |" in text and "| Healthy | 0 | 0 | 0 | 0 | 0 | 9 |" in text
    assert "MSLD v2.0" in text and "fold1" in text and "train 537" in text and "epochs 30" in text
    assert "MKP_01_01.jpg" in text and "exact duplicates: 2" in text
    assert "Patient-level grouping**: enforced" in text
    assert not (run / "MODEL_CARD.md").exists()


def test_build_card_never_crashes_on_sparse_input():
    for meta in ({}, {"model": None, "classes": None, "calibration": {"temperature": 1.5}},
                 {"model": {"head": "agfn"}, "data": {"root": "/tmp/synthetic"}, "validation": {"acc": 0.5}}):
        text = build_card(meta, metrics={"odd": [[1, 2], [3]], "nested": {"a": {"b": [1]}}}, audit=["x", 1])
        assert DISCLAIMER in text and "not recorded" in text
    assert "Trained on synthetic images" in build_card({"data": {"root": "/tmp/synthetic"}})
    # hand-made --metrics files with blocks of the wrong shape (a traceback before session 19)
    screening = {"target_class": "Mpox", "threshold": 0.3}
    for metrics in ({"accuracy": 0.8, "per_class": {"Mpox": {"recall": 0.9}}, "ci": {"recall": [0.1, 0.2]}},
                    {"screening": {"sensitivity": {"value": 0.9}, "specificity": None}}):
        assert DISCLAIMER in build_card({"model": {}, "screening": screening}, metrics=metrics)


def test_bad_metrics_files_are_one_line_errors(run, tmp_path):
    with pytest.raises(MpoxscopeError, match="not found"):
        write_card(run, metrics_file=tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(MpoxscopeError, match="not valid JSON"):
        write_card(run, metrics_file=bad)
    with pytest.raises(MpoxscopeError, match="not a trained run"):
        write_card(tmp_path / "empty")


def test_card_puts_bootstrap_cis_beside_numbers_and_links_plots(run, tmp_path):
    from mpoxscope.engine.uncertainty import classification_cis

    classes = read_meta(run)["classes"]
    rng = np.random.default_rng(0)
    y = rng.integers(0, len(classes), 90)
    pred = np.where(rng.random(90) < 0.7, y, (y + 1) % len(classes))
    ci = classification_cis(y, pred, classes, groups=np.arange(90) // 2, n=200)
    metrics = {"accuracy": float((y == pred).mean()), "f1_macro": ci["f1_macro"]["value"], "ci": ci,
               "per_class": {c: {"recall": ci["recall"][c]["value"], "f1": ci["f1"][c]["value"], "support": 15}
                             for c in classes}}
    (run / "evaluation").mkdir()
    (run / "evaluation" / "metrics.json").write_text(json.dumps(metrics))
    (run / "evaluation" / "reliability.png").write_bytes(b"\x89PNG")
    text = write_card(run).read_text()
    acc = ci["accuracy"]
    assert f"| accuracy | {metrics['accuracy']:.4f} (95% CI {acc['low']:.4f}–{acc['high']:.4f}) |" in text
    mpox = ci["recall"][classes[0]]
    assert f"{mpox['value']:.4f} (95% CI {mpox['low']:.4f}–{mpox['high']:.4f})" in text
    assert "resamples of 45 patients" in text
    assert "![test reliability diagram](evaluation/reliability.png)" in text and "risk_coverage" not in text


def test_card_leaves_out_a_test_evaluation_of_earlier_weights(run, synthetic_root, tmp_path, capsys):
    """`train --overwrite` replaces a run's weights but keeps the `evaluation/` folder it did not write: the
    evaluation records the digest of the weights it scored, so the card reports it only while they are the run's
    own, names it as left out afterwards, and refuses it in one line when passed with --metrics."""
    from safetensors.torch import load_file, save_file

    from mpoxscope.cli import main
    from mpoxscope.engine import rundir

    assert main(["evaluate", str(run), str(synthetic_root), "--out", str(run / "evaluation"), "--split-file", "none",
                 "--fold", "2", "--device", "cpu"]) == 0
    metrics = json.loads((run / "evaluation" / "metrics.json").read_text())
    assert metrics["model_sha256"] == rundir.weights_sha256(run)
    assert "evaluation/metrics.json" in write_card(run).read_text().split("## Evaluation")[1][:300]
    weights = load_file(str(rundir.weights_file(run)))  # "retrained": other weights in the same folder
    key = next(iter(weights))
    weights[key] = weights[key] + 1.0
    save_file(weights, str(rundir.weights_file(run)))
    text = write_card(run).read_text()
    assert "Held-out test metrics: not recorded" in text and "was left out" in text
    assert f"{metrics['accuracy']:.4f}" not in text.split("## Evaluation")[1].split("##")[0]
    capsys.readouterr()
    stale = run / "evaluation" / "metrics.json"
    code = main(["card", str(run), "--out", str(tmp_path / "c.md"), "--metrics", str(stale)])
    err = capsys.readouterr().err
    assert code == 2 and "other weights" in err and len(err.strip().splitlines()) == 1
