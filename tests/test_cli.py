"""Command line: help everywhere, one-line errors, predict keeps going past bad files, evaluate writes its report."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mpoxscope.cli import build_parser, main


def _commands() -> list[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sorted(sub.choices)


def test_engine_commands_present():
    assert {"train", "evaluate", "predict", "demo"} <= set(_commands())


@pytest.mark.parametrize("command", _commands())
def test_the_readme_documents_every_command_and_option(command):
    """Every command has a README heading or example (``mpoxscope CMD``) and every long option of it is named there
    (24 options had slipped through before this test)."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert f"mpoxscope {command}" in readme
    missing = [o for a in sub.choices[command]._actions for o in a.option_strings
               if o.startswith("--") and o != "--help" and o not in readme]
    assert not missing, f"README.md does not mention {command} {missing}"


@pytest.mark.parametrize("command", _commands())
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert "usage: mpoxscope" in capsys.readouterr().out


def test_errors_are_one_line_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mpoxscope.cli", "train", str(tmp_path / "nowhere"), "--out",
                           str(tmp_path / "run")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "nowhere: data folder not found" in proc.stderr


def test_predict_reports_bad_file_and_continues(tiny_run, synthetic_root, tmp_path, capsys):
    good = sorted((synthetic_root / "Mpox").iterdir())[:2]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    code = main(["predict", str(tiny_run), str(good[0]), str(bad), str(good[1]), "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 1
    results = json.loads(out)
    assert [r["source"] for r in results] == [str(good[0]), str(bad), str(good[1])]
    assert results[1]["error"] and results[1]["label"] is None
    for r in (results[0], results[2]):
        assert r["label"] in r["probabilities"] and abs(sum(r["probabilities"].values()) - 1) < 1e-4
    assert "broken.jpg" in err
    code = main(["predict", str(tiny_run), str(synthetic_root / "Healthy"), "--format", "csv"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and lines[0].startswith("source,label,confidence,Mpox") and len(lines) == 13


def test_evaluate_writes_report(tiny_run, synthetic_root, tmp_path, capsys):
    code = main(["evaluate", str(tiny_run), str(synthetic_root), "--out", str(tmp_path / "ev"),
                 "--split-file", "none", "--fold", "2", "--split", "validation"])
    assert code == 0
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    for key in ("accuracy", "precision_macro", "recall_macro", "f1_macro", "f1_weighted", "per_class",
                "roc_auc_ovr_macro", "confusion_matrix", "n_images", "protocol"):
        assert key in m
    assert "fold2, validation" in m["protocol"]
    assert sum(map(sum, m["confusion_matrix"])) == m["n_images"]
    assert (tmp_path / "ev" / "confusion_matrix.png").stat().st_size > 1000
    assert "Protocol:" in (tmp_path / "ev" / "report.md").read_text()
    out = capsys.readouterr().out
    assert "fold2, validation" in out and "95% CI" in out
    ci = m["ci"]["accuracy"]
    assert ci["low"] <= m["accuracy"] <= ci["high"] and "patients" in m["ci"]["method"]
    assert m["selective"]["aurc"] >= m["selective"]["aurc_optimal"]
    assert (tmp_path / "ev" / "reliability.png").stat().st_size > 1000
    assert f"[{ci['low']:.4f}, {ci['high']:.4f}]" in (tmp_path / "ev" / "report.md").read_text()
    check = m["ece_check"]  # the test ECE beside what a calibrated model would show on this many images
    assert check["perfect_mean"] <= check["perfect_p95"] and 0 <= check["p_value"] <= 1
    assert check["ece"] == pytest.approx(m["calibration"]["ece_after"])
    assert "a perfectly calibrated model" in (tmp_path / "ev" / "report.md").read_text()


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    """The README's main command, smaller: generated data, training, evaluation, report, above chance."""
    assert main(["demo", "--out", str(tmp_path / "demo"), "--images-per-class", "15"]) == 0
    m = json.loads((tmp_path / "demo" / "evaluation" / "metrics.json").read_text())
    assert m["accuracy"] > 0.5  # chance is 1/6
    out = capsys.readouterr().out
    assert "SYNTHETIC" in out and "chance level" in out
    assert "SYNTHETIC" in (tmp_path / "demo" / "README.md").read_text()


def test_evaluate_rebuilds_the_folds_the_run_recorded(tiny_run, synthetic_root, tmp_path):
    """Without --split-file, evaluate uses the run's own split (here grouped 3-fold), not what 'auto' finds."""
    import shutil

    from mpoxscope.data.protocol import resolve_folds
    from mpoxscope.data.samples import load_samples
    from mpoxscope.engine.checkpoint import read_meta, write_meta

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    meta = read_meta(run)
    meta["data"] = {"root": str(synthetic_root), "split_file": "none", "n_folds": 3, "fold": "fold2"}
    write_meta(run, meta)
    assert main(["evaluate", str(run), "--out", str(tmp_path / "ev"), "--device", "cpu"]) == 0
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    folds, _ = resolve_folds(load_samples(synthetic_root), None, n_folds=3)
    assert "grouped stratified 3-fold" in m["protocol"] and m["n_images"] == len(folds[1].test)
    assert "IN-SAMPLE" not in m["protocol"]
    # another fold's test part holds this run's training images: the score says so instead of passing as "test"
    assert main(["evaluate", str(run), "--fold", "fold1", "--out", str(tmp_path / "ev1"), "--device", "cpu"]) == 0
    m = json.loads((tmp_path / "ev1" / "metrics.json").read_text())
    own = folds[1]
    n_seen = len(set(folds[0].test) & set((*own.train, *own.validation)))
    assert n_seen > 0 and f"IN-SAMPLE: {n_seen} of these {len(folds[0].test)} images" in m["protocol"]
