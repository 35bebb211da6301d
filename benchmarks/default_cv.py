"""Benchmark: the default configuration on MSLD v2.0's official 5 folds, as a user would run it, timed.

Runs ``mpoxscope cv DATA --split-file DATA/datalog.xlsx --out OUT --exclude-leaks`` (the default preset) in a
subprocess, then writes ``benchmarks/results/msld_v2_default.md`` and ``.json``: per-fold and mean ± std test
scores, pooled scores with 95 % patient-bootstrap CIs, the leak-free variant, screening, calibration, wall time,
machine and command; ``NAME_test_predictions.csv`` (every fold's test predictions, for later paired comparisons);
and, with ``--baseline CV_OUT`` (another cv output on the same folds, e.g. the previous default ``--preset
frozen``, or the ``*_test_predictions.csv`` written for one), a paired comparison on the pooled test predictions:
McNemar's exact test and a patient-bootstrap 95 % CI of the accuracy difference.

    python benchmarks/default_cv.py --out runs/cv_default --conditions "quiet"  # ~55 min on the 2-core CPU
    python benchmarks/default_cv.py --out runs/cv_default --render-only --baseline runs/cv_frozen
    python benchmarks/default_cv.py --out runs/cv_x --render-only --name msld_v2_x --wall-time 4900 -- --preset accurate
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import binomtest

from mpoxscope.config import ModelConfig, TrainConfig, from_dict
from mpoxscope.engine.ensemble import describe_training
from mpoxscope.engine.uncertainty import ece_words

HERE = Path(__file__).resolve().parent
PUBLISHED = [("Ali et al. 2024 (dataset authors), DenseNet121 + HAM10000 transfer, same official folds",
              "83.59 ± 2.11"),
             ("AGFN paper (2025), ResNet50 + attention fusion, split not stated", "99.81")]


def run_cv(data: Path, out: Path, extra: list[str]) -> tuple[list[str], float]:
    cmd = ["mpoxscope", "cv", str(data), "--split-file", str(data / "datalog.xlsx"), "--out", str(out),
           "--exclude-leaks", *extra]
    exe = [sys.executable, "-c", "import sys; from mpoxscope.cli import main; sys.argv[0] = 'mpoxscope'; "
                                 "sys.exit(main())", *cmd[1:]]
    t0 = time.perf_counter()
    subprocess.run(exe, check=True)
    return cmd, time.perf_counter() - t0


def pooled_predictions(cv_out: Path) -> dict[str, tuple[str, str]]:
    """"fold/filename" -> (true, predicted) over every fold's test part (an image may be in several folds' tests)."""
    rows = {}
    for f in sorted(cv_out.glob("fold*/evaluation/predictions.csv")):
        with open(f, newline="") as fh:
            for r in csv.DictReader(fh):
                rows[f"{f.parent.parent.name}/{r['filename']}"] = (r["true"], r["predicted"])
    return rows


def write_pooled(cv_out: Path, path: Path) -> int:
    """Every fold's test predictions in one CSV (fold, then the fold's predictions.csv columns), committed beside
    the report so that a later configuration can be compared image by image without rerunning this one."""
    rows, fields = [], None
    for f in sorted(cv_out.glob("fold*/evaluation/predictions.csv")):
        with open(f, newline="") as fh:
            reader = csv.DictReader(fh)
            fields = fields or ["fold", *reader.fieldnames]
            rows += [{"fold": f.parent.parent.name, **r} for r in reader]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields or ["fold"])
        writer.writeheader()
        writer.writerows(rows)
    return len(rows)


def baseline_predictions(baseline: Path) -> dict[str, tuple[str, str]]:
    """``--baseline``: a cv output folder, or a pooled CSV that ``write_pooled`` wrote for an earlier run."""
    if baseline.is_dir():
        return pooled_predictions(baseline)
    with open(baseline, newline="") as fh:
        return {f"{r['fold']}/{r['filename']}": (r["true"], r["predicted"]) for r in csv.DictReader(fh)}


def patient(key: str) -> str:
    return "_".join(Path(key.split("/", 1)[-1]).stem.split("_")[:2])


def paired(new: dict, old: dict, n_boot: int = 2000, seed: int = 0) -> dict:
    """McNemar's exact test and a patient-bootstrap CI of accuracy(new) - accuracy(old) on common images."""
    names = sorted(set(new) & set(old))
    a = np.array([new[n][0] == new[n][1] for n in names])
    b = np.array([old[n][0] == old[n][1] for n in names])
    only_new, only_old = int((a & ~b).sum()), int((~a & b).sum())
    p = binomtest(only_new, only_new + only_old, 0.5).pvalue if only_new + only_old else 1.0
    groups = np.array([patient(n) for n in names])
    uniq = np.unique(groups)
    members = [np.flatnonzero(groups == g) for g in uniq]
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n_boot):
        idx = np.concatenate([members[i] for i in rng.integers(0, len(uniq), len(uniq))])
        diffs.append(a[idx].mean() - b[idx].mean())
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return {"n": len(names), "accuracy_new": float(a.mean()), "accuracy_old": float(b.mean()),
            "difference": float(a.mean() - b.mean()), "ci95": [float(lo), float(hi)], "only_new_right": only_new,
            "only_old_right": only_old, "mcnemar_exact_p": float(p), "n_patients": len(uniq)}


def pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}"


def ci(d: dict) -> str:
    return f"{100 * d['value']:.1f} [{100 * d['low']:.1f}, {100 * d['high']:.1f}]"


def model_line(summary: dict) -> str:
    """The configuration in words, every member by its own recipe (``engine.ensemble.describe_training``)."""
    return describe_training(from_dict(ModelConfig, summary["model"]), from_dict(TrainConfig, summary["train"]))


def wall_text(summary: dict, wall: float | None) -> str:
    """The measured wall time, else cv's own clock — unless that cv reused finished folds (then it is a rerun's)."""
    if wall:
        return f"{wall / 60:.1f} min for the whole command"
    if not summary.get("reused_folds"):
        return f"{summary['wall_time_s'] / 60:.1f} min (cv's own clock)"
    folds = sum(r.get("wall_time_s") or 0 for r in summary["per_fold"]) / 60
    return (f"not measured for the whole command (cv reused {len(summary['reused_folds'])} finished folds; their "
            f"recorded times sum to {folds:.1f} min)")


def render(summary: dict, cmd: list[str], wall: float | None, comparison: dict | None, baseline: str | None,
           conditions: str, title: str, machine: str) -> str:
    s, lf = summary["summary"], summary.get("leak_free", {}).get("summary")
    unc = summary.get("uncertainty", {}).get("pooled", {})
    lines = [f"# MSLD v2.0, official 5 folds: {title}", "",
             f"**Protocol:** {summary['protocol']}  ",
             f"**Command:** `{shlex.join(cmd)}`  ",
             f"**Model:** {model_line(summary)}  ",
             f"**Wall time:** {wall_text(summary, wall)}",
             f"**Machine:** {machine}; {conditions}",
             "", "| test, % | mean ± std over folds | pooled, 95 % CI (patient bootstrap) | leak-free mean ± std |",
             "|---|---|---|---|"]
    for key, name in (("accuracy", "accuracy"), ("f1_macro", "macro-F1")):
        pooled = ci(unc["ci"][key]) if unc.get("ci", {}).get(key) else "n/a"
        leak = f"{pct(lf[key]['mean'])} ± {pct(lf[key]['std'])}" if lf else "n/a"
        lines.append(f"| {name} | {pct(s[key]['mean'])} ± {pct(s[key]['std'])} | {pooled} | {leak} |")
    lines += ["", "| fold | n test | accuracy, 95 % CI | macro-F1, 95 % CI | validation macro-F1 | wall (s) |",
              "|---|---|---|---|---|---|"]
    fold_ci = summary.get("uncertainty", {}).get("per_fold", {})
    for r in summary["per_fold"]:
        c = fold_ci.get(r["fold"], {}).get("ci", {})  # test images resampled by patient, within the fold
        acc = ci(c["accuracy"]) if "accuracy" in c else pct(r["accuracy"])
        f1 = ci(c["f1_macro"]) if "f1_macro" in c else pct(r["f1_macro"])
        lines.append(f"| {r['fold']} | {r['n_images']} | {acc} | {f1} | "
                     f"{pct(r.get('validation_f1_macro'))} | {r.get('wall_time_s') or ''} |")
    if unc:
        ece = ece_words(unc.get("ece", float("nan")), unc.get("ece_check"))
        lines += ["", f"Pooled test ECE (15 bins): {ece}; AURC {unc.get('aurc', 0):.3f}."]
    sc = summary.get("screening")
    if sc and "sensitivity" in sc:
        lines += ["", f"Screening ({sc['target_class']} first, target sensitivity {pct(sc['target_sensitivity'])} %, "
                  f"threshold on pooled out-of-fold validation): test sensitivity {ci(sc['sensitivity'])} %, "
                  f"specificity {ci(sc['specificity'])} %, referral rate {pct(sc['referral_rate'])} %."]
    if comparison:
        c = comparison
        lines += ["", f"## Paired comparison with `{baseline}` (same {c['n']} pooled test images)", "",
                  f"accuracy {pct(c['accuracy_new'])} % vs {pct(c['accuracy_old'])} %: difference "
                  f"{100 * c['difference']:+.2f} points, 95 % CI [{100 * c['ci95'][0]:+.2f}, "
                  f"{100 * c['ci95'][1]:+.2f}] "
                  f"(bootstrap over {c['n_patients']} patients); discordant images: {c['only_new_right']} right only "
                  f"with this configuration, {c['only_old_right']} only with the baseline; McNemar exact p = "
                  f"{c['mcnemar_exact_p']:.4f}."]
    lines += ["", "Published on MSLD v2.0 (accuracy, %):", ""] + [f"- {n}: {v}" for n, v in PUBLISHED]
    return "\n".join(lines) + "\n"


def kept_notes(report: Path) -> str:
    """The hand-written part of an existing report (from its first ``## Notes`` heading or ``Notes (by hand``
    paragraph on), so a re-render keeps it."""
    text = report.read_text() if report.is_file() else ""
    found = re.search(r"^(## Notes|Notes \(by hand)", text, flags=re.MULTILINE)
    return "" if found is None else "\n" + text[found.start():]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="MSLD v2.0 folder (default $MPOXSCOPE_MSLD or ../shared/...)")
    ap.add_argument("--out", required=True, help="cv output folder (finished folds are reused)")
    ap.add_argument("--render-only", action="store_true", help="only (re)write the result files")
    ap.add_argument("--baseline", help="another cv output on the same folds, or the *_test_predictions.csv this script "
                                       "wrote for one, for the paired comparison")
    ap.add_argument("--name", default="msld_v2_default", help="result file stem under benchmarks/results/")
    ap.add_argument("--title", default="the default configuration",
                    help="what the report calls the configuration (another --name: say it is a candidate)")
    ap.add_argument("--conditions", help="what else ran on the machine meanwhile, for the report (a wall time means "
                                         "little without it); --render-only keeps the recorded one if not given")
    ap.add_argument("--machine", default=f"{platform.processor() or platform.machine()}, 2 cores, no GPU",
                    help="where the cv ran, for the report (default: this machine, as the 2-core development CPU)")
    ap.add_argument("--wall-time", type=float, help="with --render-only, for an output this script did not run: its "
                    "wall time in seconds as measured outside (e.g. /usr/bin/time)")
    ap.add_argument("extra", nargs="*", help="more cv options after --, e.g. -- --preset frozen")
    args = ap.parse_args()
    from mpoxscope.data.samples import msld_root

    data = Path(args.data) if args.data else msld_root()
    out = Path(args.out)
    cmd = ["mpoxscope", "cv", str(data), "--split-file", str(data / "datalog.xlsx"), "--out", str(out),
           "--exclude-leaks", *args.extra]
    wall, conditions = None, args.conditions
    if not args.render_only:
        cmd, wall = run_cv(data, out, args.extra)
    else:  # keep the command and wall time recorded when this output was measured
        recorded = HERE / "results" / f"{args.name}.json"
        prev = json.loads(recorded.read_text()) if recorded.is_file() else {}
        if str(out) in prev.get("command", []):
            cmd, wall = prev["command"], prev.get("wall_time_s")
            conditions = conditions or prev.get("conditions")
        wall = args.wall_time if args.wall_time is not None else wall
    summary = json.loads((out / "cv_summary.json").read_text())
    for r, m in zip(summary["per_fold"], summary["per_fold"]):
        meta = json.loads((out / m["fold"] / "run" / "model.json").read_text())
        r["validation_f1_macro"] = meta.get("validation", {}).get("f1_macro")
    comparison = (paired(pooled_predictions(out), baseline_predictions(Path(args.baseline))) if args.baseline
                  else None)
    results = HERE / "results"
    write_pooled(out, results / f"{args.name}_test_predictions.csv")
    conditions = conditions or "what else ran beside it: not stated"
    report = results / f"{args.name}.md"
    report.write_text(render(summary, cmd, wall, comparison, args.baseline,
                             conditions, args.title, args.machine) + kept_notes(report))
    (results / f"{args.name}.json").write_text(json.dumps({"command": cmd, "wall_time_s": wall,
                                                           "conditions": conditions,
                                                           "summary": summary["summary"],
                                                           "per_fold": summary["per_fold"],
                                                           "paired_comparison": comparison}, indent=2) + "\n")
    print(f"wrote {results / args.name}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
