"""Cross-validation: per fold, train (selection on that fold's validation part only), evaluate once on its test
part; then mean +/- std over folds, a pooled confusion matrix, and a Markdown report with plots.

Resumable: a fold whose ``evaluation/metrics.json`` exists is not run again. With a frozen trunk the trunk's
outputs are computed once for every image and shared by all folds (each image's augmented views are seeded by
its index, so they are the same in every fold).
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mpoxscope.config import DataConfig, ModelConfig, TrainConfig, to_dict
from mpoxscope.data.samples import SampleSet
from mpoxscope.data.splits import Fold
from mpoxscope.engine import distributed, rundir
from mpoxscope.engine.checkpoint import read_meta
from mpoxscope.engine.cv_uncertainty import cv_uncertainty, uncertainty_report_lines
from mpoxscope.engine.device import resolve_device
from mpoxscope.engine.ensemble import train_ensemble
from mpoxscope.engine.evaluate import confusion_png, evaluate
from mpoxscope.engine.features import FeatureBank, cached_feature_bank
from mpoxscope.engine.imagecache import ImageCache, build_image_cache
from mpoxscope.engine.predict import Predictor
from mpoxscope.engine.rundir import FEATURE_CACHE
from mpoxscope.engine.runner import PreparedData, prepare
from mpoxscope.engine.train import run_matches, seed_everything, train
from mpoxscope.errors import MpoxscopeError
from mpoxscope.fileio import mark_output_dir, read_json, write_bytes, write_json, write_text
from mpoxscope.models.factory import create_model

SUMMARY_KEYS = ("accuracy", "precision_macro", "recall_macro", "f1_macro", "f1_weighted", "roc_auc_ovr_macro")

#: ``leak_filter(data, fold) -> set of test indices`` linked to the fold's training/validation images.
LeakFilter = Callable[[PreparedData, Fold], set]


@dataclass
class CVConfig:
    out: str
    exclude_leaks: bool = False
    folds: tuple[str, ...] | None = None  # run only these folds (names), default all


def audit_leak_filter(threshold: int | None = None) -> LeakFilter:
    """Test images linked to a fold's training/validation images by patient or (near-)duplicate, found by the
    audit; duplicate pairs are computed once per dataset and reused for every fold."""
    from mpoxscope.audit import find_duplicate_pairs, leaked_test_indices

    cache: dict = {}

    def leak_filter(prepared: PreparedData, fold: Fold) -> set:
        if "pairs" not in cache:
            kwargs = {} if threshold is None else {"threshold": threshold}
            cache["pairs"] = find_duplicate_pairs(prepared.data, **kwargs)
        return leaked_test_indices(prepared.data, fold, cache["pairs"])

    return leak_filter


def summarize(per_fold: list[dict], classes: list[str]) -> dict:
    """Mean and (sample) standard deviation over folds of the headline metrics and per-class F1, and the
    confusion matrix summed over folds."""
    out: dict = {"n_folds": len(per_fold), "folds": [m.get("fold") for m in per_fold]}
    for key in SUMMARY_KEYS:
        vals = [m[key] for m in per_fold if m.get(key) is not None]
        out[key] = _mean_std(vals)
    out["per_class_f1"] = {c: _mean_std([m["per_class"][c]["f1"] for m in per_fold if m["per_class"][c]["support"]])
                           for c in classes}
    out["pooled_confusion_matrix"] = np.sum([m["confusion_matrix"] for m in per_fold], axis=0).tolist()
    out["n_test_images_total"] = int(sum(m["n_images"] for m in per_fold))
    return out


def _mean_std(vals: list[float]) -> dict:
    if not vals:
        return {"mean": None, "std": None, "values": []}
    a = np.asarray(vals, dtype=float)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "values": a.tolist()}


def shared_bank(data: SampleSet, folds: list[Fold], model_cfg: ModelConfig, train_cfg: TrainConfig,
                progress: bool = True, cache_file: Path | None = None) -> FeatureBank | None:
    """One feature bank over every image any fold trains or validates on, when the trunk is frozen (kept in
    ``cache_file`` so an interrupted cross-validation does not compute it again)."""
    if train_cfg.cache_views <= 0:
        return None
    seed_everything(train_cfg.seed)
    device = resolve_device(train_cfg.device)
    model = create_model(model_cfg, len(data.classes)).to(device)
    stop = model.trunk_stop(train_cfg.trainable_stages)
    if stop == 0:
        return None
    needed = sorted({i for f in folds for i in (*f.train, *f.validation)})
    return cached_feature_bank(cache_file, model, stop, data, needed, train_cfg.cache_views, train_cfg.seed,
                               train_cfg.augment, device, progress=progress, desc="caching features (all folds)",
                               num_workers=train_cfg.num_workers)


def member_banks(data: SampleSet, folds: list[Fold], model_cfg: ModelConfig, train_cfg: TrainConfig,
                 out: Path, progress: bool) -> dict[str, FeatureBank]:
    """One shared feature bank per frozen-trunk ensemble member (e.g. ``tf_efficientnet_lite2@frozen``), kept in
    ``OUT/<member>.feature_cache.safetensors``: computed once for all folds instead of once per fold."""
    from mpoxscope.engine.ensemble import member_configs

    banks = {}
    for name, mc, tc in member_configs(train_cfg.ensemble, model_cfg, train_cfg):
        bank = shared_bank(data, folds, mc, tc, progress, out / f"{name}.{FEATURE_CACHE}")
        if bank is not None:
            banks[name] = bank
    return banks


def shared_images(data: SampleSet, folds: list[Fold], model_cfg: ModelConfig, train_cfg: TrainConfig,
                  progress: bool = True) -> ImageCache:
    """Every image any fold trains or validates on, decoded once for all folds (and all ensemble members)."""
    needed = sorted({i for f in folds for i in (*f.train, *f.validation)})
    return build_image_cache(data, needed, model_input_size(model_cfg, train_cfg), workers=train_cfg.num_workers,
                             progress_bar=progress)


def model_input_size(model_cfg: ModelConfig, train_cfg: TrainConfig) -> int:
    """The image size the trained model reads: an ensemble's (its largest member's ``/PX``), else the recipe's."""
    from mpoxscope.engine.ensemble import input_size

    return input_size(train_cfg.ensemble, model_cfg, train_cfg) if train_cfg.ensemble else model_cfg.image_size


def shared_inputs(data: SampleSet, folds: list[Fold], model_cfg: ModelConfig, train_cfg: TrainConfig, out: Path,
                  progress: bool = True) -> tuple[FeatureBank | None, ImageCache | None, dict[str, FeatureBank]]:
    """What the folds still to train share, computed once: the frozen trunk's feature bank (one model), else the
    decoded images, and each frozen-trunk ensemble member's bank (caches kept under ``out``)."""
    several = len(folds) > 1
    bank = shared_bank(data, folds, model_cfg, train_cfg, progress,
                       out / FEATURE_CACHE) if several and not train_cfg.ensemble else None
    images = shared_images(data, folds, model_cfg, train_cfg, progress) if bank is None and folds else None
    banks = member_banks(data, folds, model_cfg, train_cfg, out, progress) if several else {}
    return bank, images, banks


def cross_validate(data_cfg: DataConfig, model_cfg: ModelConfig, train_cfg: TrainConfig, cv: CVConfig,
                   leak_filter: LeakFilter | None = None, progress: bool = True, log=print) -> dict:
    """Run every fold; returns the summary dict that is also written to ``OUT/cv_summary.json``."""
    t0 = time.perf_counter()
    out = Path(cv.out)
    prepared = prepare(data_cfg, train_cfg.seed)
    folds = [f for f in prepared.folds if cv.folds is None or f.name in cv.folds]
    unknown = sorted(set(cv.folds or ()) - {f.name for f in prepared.folds})
    if unknown:  # before any file or minute of work
        raise MpoxscopeError(f"--only-folds: no fold {', '.join(unknown)} in {prepared.split_source}; "
                             f"available: {', '.join(f.name for f in prepared.folds)}")
    log(f"cross-validation: {len(prepared.data)} images, {prepared.split_source}, folds "
        f"{', '.join(f.name for f in folds)}")
    if distributed.is_main():  # before the first file: a killed cv's folder stays recognisably ours (resume)
        mark_output_dir(out, "cv")
    todo = [f for f in folds if not (out / f.name / rundir.EVALUATION / rundir.EVAL_METRICS).is_file()]
    bank, images, banks = shared_inputs(prepared.data, todo, model_cfg, train_cfg, out, progress)
    per_fold, leak_free = [], []
    for fold in folds:
        m = _run_fold(prepared, fold, out / fold.name, model_cfg, train_cfg, bank, images, progress, log, banks)
        if m is None:  # a torchrun rank other than 0
            continue
        per_fold.append(m)
        log(f"{fold.name}: test accuracy {m['accuracy']:.4f}, macro-F1 {m['f1_macro']:.4f} (n={m['n_images']}); "
            f"validation macro-F1 {m['validation'].get('f1_macro', float('nan')):.4f}")
        if cv.exclude_leaks and leak_filter is not None:
            leak_free.append(_leak_free_fold(prepared, fold, out / fold.name, leak_filter, train_cfg.device))
    if not distributed.is_main():
        return {}
    summary = _summary(prepared, folds, model_cfg, train_cfg, per_fold, leak_free, time.perf_counter() - t0)
    summary["screening"] = cv_screening(out, [f.name for f in folds], train_cfg, summary["protocol"], log)
    # Bootstrap CIs (by patient), test ECE, reliability and risk-coverage, per fold and pooled (issue 9).
    summary["uncertainty"] = cv_uncertainty(out, [f.name for f in folds], prepared.data, summary["protocol"], log)
    _write_outputs(out, summary, prepared.data.classes)
    return summary


def _protocol(prepared: PreparedData, fold: Fold, split: str = "test") -> str:
    return f"{prepared.info(fold)['dataset']}, {prepared.split_source}, {fold.name}, {split}"


def _run_fold(prepared: PreparedData, fold: Fold, fold_dir: Path, model_cfg: ModelConfig, train_cfg: TrainConfig,
              bank: FeatureBank | None, images: ImageCache | None, progress: bool, log,
              member_banks: dict[str, FeatureBank] | None = None) -> dict | None:
    """Train one fold (or read its finished evaluation) and evaluate it on validation, then test, once; the
    test metrics with the fold's validation block. None on torchrun ranks other than 0."""
    done = fold_dir / rundir.EVALUATION / rundir.EVAL_METRICS
    if done.is_file() and run_matches(fold_dir / rundir.CV_RUN, model_cfg, train_cfg, prepared.info(fold)):
        log(f"{fold.name}: already evaluated, skipping")
        m = {**read_json(done), "reused": True}  # its wall time is an earlier command's
    else:
        tf = time.perf_counter()
        data = prepared.data
        train_model(data, fold, model_cfg, train_cfg, fold_dir / rundir.CV_RUN, prepared.info(fold), bank=bank,
                    images=images, progress=progress, log=log, member_banks=member_banks)
        if not distributed.is_main():  # under torchrun, rank 0 alone evaluates and writes
            return None
        te = time.perf_counter()
        # a leak-free score belongs to the evaluation it subsets: this fold is evaluated anew, so is that
        (fold_dir / rundir.EVALUATION_LEAK_FREE / rundir.EVAL_METRICS).unlink(missing_ok=True)
        predictor = Predictor.from_run(fold_dir / rundir.CV_RUN, device=train_cfg.device)
        # Validation predictions (what screening and pooled calibration are fitted on; those the training run
        # already computed when it chose views and calibration), then test, once.
        evaluate(predictor, data, fold.validation, fold_dir / rundir.VALIDATION,
                 _protocol(prepared, fold, "validation"), predictions=_validation_predictions(data, fold, predictor))
        m = evaluate(predictor, data, fold.test, fold_dir / rundir.EVALUATION, _protocol(prepared, fold))
        m["wall_time_s"] = round(time.perf_counter() - tf, 1)
        m["phases_s"] = fold_phases(fold_dir / rundir.CV_RUN, te - tf, time.perf_counter() - te)
        write_json(done, {**m, "fold": fold.name})
        log(f"{fold.name}: {m['wall_time_s']:.0f} s — {phases_line(m['phases_s'])}")
    if not distributed.is_main():
        return None
    m["fold"] = fold.name
    m["validation"] = read_meta(fold_dir / rundir.CV_RUN).get("validation", {})
    return m


def fold_phases(run_dir: Path, train_s: float, evaluate_s: float) -> dict[str, float]:
    """Where one fold's time went, in seconds: ``training`` (everything ``train`` did: members, views, calibration,
    refits), each training run's own clock (``train MEMBER``), each refit's (``refit MEMBER``), and ``evaluation``
    (validation and test predictions and reports). The named parts are inside ``training``; what it holds beyond
    them is shared work (feature banks, the ensemble's calibration, probe refits)."""
    phases = {"training": round(train_s, 1)}
    runs = sorted(p for p in (run_dir / rundir.MEMBERS).glob("*") if p.is_dir()) or [run_dir]
    for run in runs:
        name = run.name if run != run_dir else "model"
        state = read_json(run / rundir.STATE) if (run / rundir.STATE).is_file() else {}
        if state.get("wall_time_s") is not None:
            phases[f"train {name}"] = state["wall_time_s"]
        seconds = (read_meta(run).get("refit") or {}).get("seconds")
        if seconds is not None:
            phases[f"refit {name}"] = seconds
    phases["evaluation"] = round(evaluate_s, 1)
    return phases


def phases_line(phases: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.0f} s" for k, v in phases.items())


def train_model(data, fold: Fold, model_cfg: ModelConfig, train_cfg: TrainConfig, run_dir: Path, info: dict,
                bank: FeatureBank | None = None, images: ImageCache | None = None, progress: bool = True, log=print,
                member_banks: dict[str, FeatureBank] | None = None) -> None:
    """Train what the configuration describes on one fold: an ensemble of its members when
    ``train_cfg.ensemble`` names any, else one model (what ``cv`` and ``protocols`` both train per fold)."""
    if train_cfg.ensemble:
        train_ensemble(data, fold, model_cfg, train_cfg, train_cfg.ensemble, run_dir, info, images=images,
                       progress=progress, log=log, banks=member_banks)
    else:
        train(data, fold, model_cfg, train_cfg, run_dir, info, bank=bank, images=images, progress=progress, log=log)


def _validation_predictions(data, fold: Fold, predictor: Predictor) -> tuple | None:
    """The run's own calibrated validation probabilities, as :func:`evaluate` takes them; None for runs that did
    not keep them (older ones), which are then scored again."""
    from mpoxscope.engine.finish import load_validation_probs

    names = [data.samples[i].filename for i in fold.validation]
    probs = load_validation_probs(predictor.run_dir, names, predictor.meta)
    if probs is None:
        return None
    return probs, np.array([data.targets[i] for i in fold.validation]), names, []


def _leak_free_fold(prepared: PreparedData, fold: Fold, fold_dir: Path, leak_filter: LeakFilter,
                    device: str) -> dict:
    """The fold's test score without the test images the audit links to its training/validation images."""
    leaked = leak_filter(prepared, fold)
    lf_done = fold_dir / rundir.EVALUATION_LEAK_FREE / rundir.EVAL_METRICS
    dropped = sorted(prepared.data.samples[i].filename for i in leaked)
    earlier = read_json(lf_done) if lf_done.is_file() else None
    if earlier is not None and earlier.get("dropped_files") == dropped:  # same images left out (same threshold)
        lm = earlier
    else:
        predictor = Predictor.from_run(fold_dir / rundir.CV_RUN, device=device)
        keep = [i for i in fold.test if i not in leaked]
        lm = evaluate(predictor, prepared.data, keep, fold_dir / rundir.EVALUATION_LEAK_FREE,
                      _protocol(prepared, fold) + f", leak-free ({len(leaked)} linked test images dropped)",
                      predictions=_test_predictions(fold_dir, {prepared.data.samples[i].filename for i in keep},
                                                    predictor.classes))
        lm["n_dropped"] = len(leaked)
        write_json(lf_done, {**lm, "fold": fold.name, "dropped_files": dropped})
    lm["fold"] = fold.name
    return lm


def _test_predictions(fold_dir: Path, names: set[str], classes: list[str]) -> tuple | None:
    """The fold's saved test predictions restricted to ``names`` (the leak-free part is a subset of the test
    part, so its images need not be predicted twice); None when they cannot be read unambiguously."""
    from mpoxscope.engine.screening import read_predictions_csv

    path = fold_dir / rundir.EVALUATION / rundir.PREDICTIONS
    try:
        pred, header = read_predictions_csv(path)
        failed = read_json(fold_dir / rundir.EVALUATION / rundir.EVAL_METRICS).get("failed_files") or []
    except (OSError, ValueError, AttributeError, MpoxscopeError):
        return None
    if header != list(classes) or len(set(pred.names)) != len(pred.names):  # same file name in two classes
        return None
    rows = [r for r, n in enumerate(pred.names) if n in names]
    return pred.probs[rows], pred.targets[rows], [pred.names[r] for r in rows], list(failed)


def _wall_line(summary: dict) -> str:
    """This command's wall time, and what the folds it reused from an earlier command had recorded."""
    reused = summary.get("reused_folds") or []
    line = f"{summary['wall_time_s']:.0f} s for this command"
    if not reused:
        return line
    earlier = sum(m.get("wall_time_s") or 0 for m in summary["per_fold"] if m.get("fold") in reused)
    return (f"{line}; {len(reused)} of {len(summary['per_fold'])} folds reused from an earlier command (their "
            f"recorded training and evaluation: {earlier:.0f} s)")


def _refit_words(model_cfg: ModelConfig, train_cfg: TrainConfig) -> str:
    from mpoxscope.engine.ensemble import refit_specs

    named = refit_specs(model_cfg, train_cfg) if train_cfg.ensemble else None
    if named is not None:  # a member's own refit= departs from what the flags say
        return (f"; then {' + '.join(named) or 'no member'} refit on training + validation for what validation "
                f"chose (member refit= options)")
    if train_cfg.refit_trained:
        return "; then every model refit on training + validation for what validation chose (--refit-trained)"
    return "; then the probes refit on training + validation (--refit)" if train_cfg.refit else ""


def _summary(prepared: PreparedData, folds: list[Fold], model_cfg: ModelConfig, train_cfg: TrainConfig,
             per_fold: list[dict], leak_free: list[dict], wall_s: float) -> dict:
    classes = prepared.data.classes
    summary = {
        "protocol": f"{prepared.info(folds[0])['dataset']}, {prepared.split_source}, "
                    f"{len(folds)} folds, test parts; model selection, test-time views and calibration on each "
                    f"fold's validation part only"
                    + _refit_words(model_cfg, train_cfg),
        "model": to_dict(model_cfg), "train": to_dict(train_cfg),
        "input_size": model_input_size(model_cfg, train_cfg),
        "summary": summarize(per_fold, classes),
        "per_fold": [{k: m.get(k) for k in (*SUMMARY_KEYS, "fold", "n_images", "wall_time_s", "phases_s")}
                     for m in per_fold],
        "classes": classes,
        "wall_time_s": round(wall_s, 1),  # this command's; folds reused from an earlier one took their own
        "reused_folds": [m["fold"] for m in per_fold if m.get("reused")],
    }
    if leak_free:
        summary["leak_free"] = {"summary": summarize(leak_free, classes),
                                "per_fold": [{k: m.get(k) for k in (*SUMMARY_KEYS, "fold", "n_images", "n_dropped")}
                                             for m in leak_free]}
    return summary


def _write_outputs(out: Path, summary: dict, classes: list[str]) -> None:
    write_json(out / "cv_summary.json", summary)
    write_bytes(out / "per_fold.png", per_fold_png(summary))
    write_bytes(out / "confusion_matrix_pooled.png",
                confusion_png(summary["summary"]["pooled_confusion_matrix"], classes,
                              "pooled over folds: " + summary["protocol"][:80]))
    write_text(out / "cv_report.md", cv_report(summary))


def per_fold_png(summary: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folds = [m["fold"] for m in summary["per_fold"]]
    x = np.arange(len(folds))
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(folds) + 2), 3.6))
    for k, (key, label) in enumerate((("accuracy", "accuracy"), ("f1_macro", "macro-F1"))):
        ax.bar(x + (k - 0.5) * 0.38, [m[key] for m in summary["per_fold"]], 0.38, label=label)
        mean = summary["summary"][key]["mean"]
        ax.axhline(mean, ls="--", lw=1, color=f"C{k}")
    ax.set_xticks(x, folds)
    ax.set_ylim(0, 1)
    ax.set_ylabel("test score")
    ax.set_title("per-fold test scores (dashed: mean)", fontsize=10)
    ax.legend(loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def _ms(d: dict) -> str:
    return "n/a" if d.get("mean") is None else f"{100 * d['mean']:.2f} ± {100 * d['std']:.2f}"


def cv_report(summary: dict) -> str:
    s = summary["summary"]
    m = summary["model"]
    t = summary["train"]
    model = (f"{m['backbone']} + {m['head']} head, {m['image_size']} px, trainable backbone stages "
             f"{t['trainable_stages']}, cached views {t['cache_views']}")
    if t.get("ensemble"):  # the members' recipes differ from the top-level one (e.g. @frozen): name them
        model = (f"ensemble of {' + '.join(t['ensemble'])} ({m['head']} heads, input "
                 f"{summary.get('input_size', m['image_size'])} px; members without /PX read {m['image_size']} px, "
                 f"members without @PRESET follow trainable stages {t['trainable_stages']}, cached views "
                 f"{t['cache_views']})")
    lines = ["# mpoxscope cross-validation", "", f"**Protocol:** {summary['protocol']}  ", f"**Model:** {model}  ",
             f"**Wall time:** {_wall_line(summary)}", "",
             "| metric (test, %) | mean ± std over folds |", "|---|---|"]
    for key in SUMMARY_KEYS:
        lines.append(f"| {key} | {_ms(s[key])} |")
    lines += uncertainty_report_lines(summary.get("uncertainty"))
    if "leak_free" in summary:
        lf = summary["leak_free"]["summary"]
        lines += ["", "Leak-free variant (test images linked by patient or near-duplicate to the fold's "
                  "training/validation images dropped):", "", "| metric (test, %) | all test images | leak-free |",
                  "|---|---|---|"]
        for key in ("accuracy", "f1_macro"):
            lines.append(f"| {key} | {_ms(s[key])} | {_ms(lf[key])} |")
    lines += ["", "## Per fold", "", "| fold | n test | accuracy | macro-F1 | ROC-AUC |" +
              (" leak-free n | leak-free accuracy |" if "leak_free" in summary else ""),
              "|---|---|---|---|---|" + ("---|---|" if "leak_free" in summary else "")]
    lf_rows = {r["fold"]: r for r in summary.get("leak_free", {}).get("per_fold", [])}
    for r in summary["per_fold"]:
        auc = r["roc_auc_ovr_macro"]
        auc_txt = "n/a" if auc is None else f"{100 * auc:.2f}"
        row = (f"| {r['fold']} | {r['n_images']} | {100 * r['accuracy']:.2f} | {100 * r['f1_macro']:.2f} | "
               f"{auc_txt} |")
        if r["fold"] in lf_rows:
            lr = lf_rows[r["fold"]]
            row += f" {lr['n_images']} | {100 * lr['accuracy']:.2f} |"
        lines.append(row)
    lines += ["", "## Per-class F1 (mean ± std over folds where the class is in the test part)", "",
              "| class | F1 (%) |", "|---|---|"]
    for c, d in s["per_class_f1"].items():
        lines.append(f"| {c} | {_ms(d)} |")
    classes = summary["classes"]
    lines += ["", "## Pooled confusion matrix (rows true, columns predicted)", "",
              "![per-fold scores](per_fold.png) ![pooled confusion matrix](confusion_matrix_pooled.png)", "",
              "| true \\ pred | " + " | ".join(classes) + " |", "|---" * (len(classes) + 1) + "|"]
    for c, row in zip(classes, s["pooled_confusion_matrix"]):
        lines.append(f"| {c} | " + " | ".join(str(v) for v in row) + " |")
    lines += screening_report_lines(summary.get("screening"))
    lines += _phase_lines(summary["per_fold"])
    return "\n".join(lines) + "\n"


def _phase_lines(per_fold: list[dict]) -> list[str]:
    """Where each fold's time went (folds trained by an older version have no phases)."""
    rows = [(r["fold"], r["wall_time_s"], r["phases_s"]) for r in per_fold if r.get("phases_s")]
    if not rows:
        return []
    return ["", "## Where the time went (s; the named runs are inside 'training')", "",
            "| fold | total | phases |", "|---|---|---|",
            *(f"| {f} | {w:.0f} | {phases_line(ph)} |" for f, w, ph in rows)]


def cv_screening(out: Path, folds: list[str], train_cfg: TrainConfig, protocol: str, log=print) -> dict | None:
    """Screening results over the folds (screening.json/.md, screening_roc_pr.png), from the folds' validation
    and test predictions; a short summary for cv_summary.json, or the reason it was skipped."""
    from mpoxscope.engine.screening import cv_summary_entry, pct, screen_cv_output, with_ci
    from mpoxscope.errors import MpoxscopeError

    target = getattr(train_cfg, "screen_class", None) or "Mpox"
    sensitivity = getattr(train_cfg, "screen_sensitivity", None) or 0.90
    try:
        r = screen_cv_output(out, target, sensitivity, folds=folds, protocol=protocol,
                             confidence=train_cfg.screen_confidence)
    except MpoxscopeError as e:
        log(f"screening: skipped ({e})")
        return {"skipped": str(e)}
    p = r["pooled"]
    log(f"screening [{r['protocol']}]: {r['target_class']} sensitivity {with_ci(p['sensitivity'])} "
        f"(target {pct(sensitivity)}), specificity {with_ci(p['specificity'])}, referral rate "
        f"{pct(p['referral_rate'])}")
    return cv_summary_entry(r)


def screening_report_lines(sc: dict | None) -> list[str]:
    """The screening section of cv_report.md (see :func:`mpoxscope.engine.screening.cv_report_lines`)."""
    from mpoxscope.engine.screening import cv_report_lines

    return cv_report_lines(sc)
