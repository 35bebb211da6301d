"""Evaluation of a trained run on one split: metrics.json, report.md, confusion-matrix PNG, predictions.csv."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from mpoxscope.data.images import load_image
from mpoxscope.data.samples import SampleSet
from mpoxscope.engine import rundir
from mpoxscope.engine.metrics import classification_metrics
from mpoxscope.engine.predict import Predictor
from mpoxscope.errors import ImageError, MpoxscopeError
from mpoxscope.fileio import write_bytes, write_json, write_text


def predict_split(predictor: Predictor, data: SampleSet, indices, batch_size: int = 16,
                  ) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """Probabilities (N, K) and targets (N,) for ``indices``; unreadable files are returned separately."""
    index = {c: i for i, c in enumerate(predictor.classes)}
    probs, targets, names, failed = [], [], [], []
    indices = list(indices)
    for s in range(0, len(indices), batch_size):
        images, ys = [], []
        for i in indices[s:s + batch_size]:
            sample = data.samples[i]
            if sample.label not in index:
                raise MpoxscopeError(f"class {sample.label!r} of {sample.path} is not one of the model's classes "
                                     f"{predictor.classes}")
            try:
                images.append(load_image(sample.path))
            except ImageError as e:
                failed.append(str(e))
                continue
            ys.append(index[sample.label])
            names.append(sample.filename)
        if images:
            probs.append(predictor.predict_images(images))
            targets.extend(ys)
    k = len(predictor.classes)
    return (np.concatenate(probs) if probs else np.zeros((0, k))), np.asarray(targets, dtype=int), names, failed


def model_protocol(meta: dict) -> str:
    """What the scored model is, for the protocol string: ensemble size and test-time views (both chosen on
    validation)."""
    parts = []
    if meta.get("kind") == "ensemble":
        parts.append(f"ensemble of {len(meta.get('members') or [])} ({meta.get('model', {}).get('backbone', '?')})")
    views = (meta.get("tta") or {}).get("views")
    if views and list(views) != ["id"]:
        parts.append(f"test-time views {'+'.join(views)}")
    return "".join(f", {p}" for p in parts)


def confusion_png(cm: list[list[int]], classes: list[str], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm_a = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(1.1 * len(classes) + 2.5, 1.0 * len(classes) + 2))
    ax.imshow(cm_a, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=40, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    for (r, c), v in np.ndenumerate(cm_a):
        ax.text(c, r, str(v), ha="center", va="center", color="white" if v > cm_a.max() / 2 else "black")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def markdown_report(m: dict, protocol: str, meta: dict) -> str:
    classes = m["classes"]
    lines = [
        "# mpoxscope evaluation",
        "",
        f"**Protocol:** {protocol}  ",
        f"**Model:** {meta['model']['backbone']} + {meta['model']['head']} head, {meta['image_size']} px, "
        f"pretrained: {meta.get('pretrained_source', '?')}  ",
        f"**Images:** {m['n_images']}" + (f" ({len(m['failed_files'])} unreadable, excluded)"
                                           if m.get("failed_files") else ""),
        "",
        "| metric | value |", "|---|---|",
        f"| accuracy | {m['accuracy']:.4f}{_ci(m, 'accuracy')} |",
        f"| macro precision / recall / F1 | {m['precision_macro']:.4f} / {m['recall_macro']:.4f} / "
        f"{m['f1_macro']:.4f}{_ci(m, 'f1_macro')} |",
        f"| weighted precision / recall / F1 | {m['precision_weighted']:.4f} / {m['recall_weighted']:.4f} / "
        f"{m['f1_weighted']:.4f}{_ci(m, 'f1_weighted')} |",
        f"| ROC-AUC (one-vs-rest, macro) | {_fmt(m['roc_auc_ovr_macro'])} |",
    ]
    cal = m.get("calibration")
    if cal:
        lines.append(f"| test ECE (15 bins) before / after calibration ({cal.get('method', 'temperature')}, "
                     f"T={cal['temperature']:.3f}) | {_fmt(cal['ece_before'])} / {_fmt(cal['ece_after'])} |")
        if cal.get("abstain_threshold") is not None:
            lines.append(f"| abstain below p={cal['abstain_threshold']:.3f}: coverage / accuracy on kept | "
                         f"{_fmt(cal.get('coverage'))} / {_fmt(cal.get('accuracy_kept'))} |")
    check = m.get("ece_check")
    if check:  # on a few hundred images a calibrated model shows a positive ECE too: say how large
        lines.append(f"| test ECE of a perfectly calibrated model with these confidences on {m['n_images']} images: "
                     f"mean (95th percentile); P(ECE ≥ observed) | {check['perfect_mean']:.4f} "
                     f"({check['perfect_p95']:.4f}); {check['p_value']:.2f} |")
    sel = m.get("selective")
    if sel:
        kept = sel.get("accuracy_kept_ci")
        lines.append(f"| risk–coverage: AURC (oracle, excess) | {sel['aurc']:.4f} ({sel['aurc_optimal']:.4f}, "
                     f"{sel['eaurc']:.4f}) |")
        if kept:
            lines.append(f"| accuracy on kept cases at the validation threshold, 95% CI | "
                         f"{kept['value']:.4f} [{kept['low']:.4f}, {kept['high']:.4f}] |")
    if m.get("ci"):
        lines += ["", f"95% confidence intervals in brackets: {m['ci']['method']}."]
    lines += ["", "## Per class", "", "| class | precision | recall [95% CI] | F1 [95% CI] | ROC-AUC | support |",
              "|---|---|---|---|---|---|"]
    for c in classes:
        pc = m["per_class"][c]
        lines.append(f"| {c} | {pc['precision']:.3f} | {pc['recall']:.3f}{_ci(m, 'recall', c)} | "
                     f"{pc['f1']:.3f}{_ci(m, 'f1', c)} | {_fmt(pc.get('roc_auc'))} | {pc['support']} |")
    lines += ["", "![reliability diagram](reliability.png) ![risk-coverage curve](risk_coverage.png)"]
    lines += ["", "## Confusion matrix (rows true, columns predicted)", "", "![confusion matrix](confusion_matrix.png)",
              "", "| true \\ pred | " + " | ".join(classes) + " |", "|---" * (len(classes) + 1) + "|"]
    for c, row in zip(classes, m["confusion_matrix"]):
        lines.append(f"| {c} | " + " | ".join(str(v) for v in row) + " |")
    lines += _screening_report(m.get("screening"))
    if m.get("failed_files"):
        lines += ["", "## Unreadable files (excluded)", ""] + [f"- {f}" for f in m["failed_files"]]
    return "\n".join(lines) + "\n"


def _screening_metrics(predictor: Predictor, probs: np.ndarray, targets: np.ndarray, data: SampleSet,
                       names: list[str], out: Path, protocol: str) -> dict | None:
    """Screening results at the run's validation-chosen threshold (None when the run has no screening block);
    writes screening_roc_pr.png."""
    from mpoxscope.engine.screening import curves_png, screening_metrics

    screening = predictor.meta.get("screening")
    if not screening:
        return None
    index = data.by_filename()
    groups = [data.samples[index[n]].group for n in names]  # patient-level bootstrap
    sm = screening_metrics(probs, targets, predictor.classes, screening, predictor.meta.get("calibration"), groups)
    sm["protocol"] = protocol + "; threshold chosen on the run's validation part"
    target = predictor.classes.index(sm["target_class"])
    write_bytes(out / "screening_roc_pr.png", curves_png(probs[:, target], targets == target, sm, protocol))
    return sm


def _screening_report(sm: dict | None) -> list[str]:
    if not sm:
        return []
    from mpoxscope.engine.screening import metrics_markdown, rule_markdown

    return ["", f"## Screening: catch {sm['target_class']} first", "", rule_markdown(sm), "",
            *metrics_markdown(sm, "screening_roc_pr.png")]


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _ci(m: dict, key: str, cls: str | None = None) -> str:
    """`` [lo, hi]`` from m["ci"] (the 95 % bootstrap interval), or nothing when absent."""
    ci = (m.get("ci") or {}).get(key) or {}
    if cls is not None:
        ci = ci.get(cls) or {}
    d = 3 if cls is not None else 4
    return "" if ci.get("low") is None else f" [{ci['low']:.{d}f}, {ci['high']:.{d}f}]"


def evaluate(predictor: Predictor, data: SampleSet, indices, out_dir: str | Path, protocol: str,
             predictions: tuple[np.ndarray, np.ndarray, list[str], list[str]] | None = None) -> dict:
    """Predict ``indices`` of ``data``, write metrics.json, report.md, confusion_matrix.png and predictions.csv
    to ``out_dir``; return the metrics dict (which carries its ``protocol``). ``predictions``: what
    :func:`predict_split` would return for ``indices``, when it is already known (no model is run then)."""
    out = Path(out_dir)
    probs, targets, names, failed = predictions if predictions is not None else \
        predict_split(predictor, data, indices)
    if len(targets) == 0:
        raise MpoxscopeError(f"no readable images to evaluate ({protocol})")
    m = classification_metrics(targets, probs, predictor.classes)
    m["protocol"] = protocol + model_protocol(predictor.meta)
    # what the card checks: these metrics belong to these weights
    m["model_sha256"] = rundir.weights_sha256_or_none(getattr(predictor, "run_dir", None),
                                                      getattr(predictor, "which", "best"))
    m["failed_files"] = failed
    m["calibration"] = _calibration_metrics(predictor, probs, targets)
    m.update(uncertainty_metrics(probs, targets, predictor.classes, _groups_of(data, names), m["calibration"]))
    write_uncertainty_plots(out, probs, targets, m, m["protocol"])
    m["screening"] = _screening_metrics(predictor, probs, targets, data, names, out, m["protocol"])
    write_json(out / rundir.EVAL_METRICS, m)
    write_text(out / "report.md", markdown_report(m, m["protocol"], predictor.meta))
    write_bytes(out / "confusion_matrix.png", confusion_png(m["confusion_matrix"], predictor.classes, m["protocol"]))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["filename", "true", "predicted", "confidence", *predictor.classes])
    for name, t, p in zip(names, targets, probs):
        w.writerow([name, predictor.classes[t], predictor.classes[int(p.argmax())], f"{p.max():.4f}",
                    *(f"{v:.6f}" for v in p)])  # 6 decimals: enough to refit a temperature later
    write_text(out / rundir.PREDICTIONS, buf.getvalue())
    return m


def _calibration_metrics(predictor: Predictor, probs: np.ndarray, targets: np.ndarray) -> dict | None:
    cal = predictor.meta.get("calibration") or {}
    try:
        from mpoxscope.engine.calibration import expected_calibration_error, selective_metrics
    except ImportError:
        return None
    t = float(cal.get("temperature", 1.0))
    method = cal.get("method", "temperature")
    ece_before = None
    if method in ("temperature", "none"):
        # probs are already tempered by t; undo it to report the uncalibrated ECE too
        logp = np.log(np.clip(probs, 1e-12, 1)) * t
        raw = np.exp(logp - logp.max(1, keepdims=True))
        raw /= raw.sum(1, keepdims=True)
        ece_before = float(expected_calibration_error(raw, targets))
    out = {"method": method, "temperature": t, "ece_bins": 15, "ece_before": ece_before,
           "ece_after": float(expected_calibration_error(probs, targets)),
           "abstain_threshold": cal.get("abstain_threshold")}
    if cal.get("abstain_threshold") is not None:
        out.update(selective_metrics(probs, targets, float(cal["abstain_threshold"])))
    return out


def _groups_of(data: SampleSet, names: list[str]) -> list[str]:
    """The patient of each evaluated image (for the patient-level bootstrap)."""
    index = data.by_filename()
    return [data.samples[index[n]].group for n in names]


def uncertainty_metrics(probs: np.ndarray, targets: np.ndarray, classes: list[str], groups: list[str] | None,
                        calibration: dict | None = None) -> dict:
    """95 % bootstrap intervals (by patient when patients are known), the risk–coverage summary and the ECE beside
    a perfectly calibrated model's (``calibration.ece_consistency``), as the ``"ci"``, ``"selective"`` and
    ``"ece_check"`` entries of metrics.json; probs (N, K), targets (N,)."""
    from mpoxscope.engine.calibration import ece_consistency
    from mpoxscope.engine.uncertainty import classification_cis, risk_coverage

    ci = classification_cis(targets, probs.argmax(1), classes, groups)
    rc = risk_coverage(probs.max(1), probs.argmax(1) == targets)
    selective = {k: rc[k] for k in ("aurc", "aurc_optimal", "eaurc")}
    if calibration and calibration.get("coverage") is not None:
        # accuracy on the cases kept at the threshold chosen on validation, with its patient bootstrap CI
        keep = probs.max(1) >= float(calibration["abstain_threshold"])
        selective.update({"abstain_threshold": calibration["abstain_threshold"],
                          "coverage": calibration["coverage"], "accuracy_kept": calibration.get("accuracy_kept")})
        if keep.sum() > 0:
            kept = classification_cis(targets[keep], probs.argmax(1)[keep], classes,
                                      None if groups is None else np.asarray(groups)[keep])
            selective["accuracy_kept_ci"] = kept["accuracy"]
    return {"ci": ci, "selective": selective, "ece_check": ece_consistency(probs, targets)}


def write_uncertainty_plots(out: Path, probs: np.ndarray, targets: np.ndarray, m: dict, title: str) -> None:
    """reliability.png (15-bin reliability diagram) and risk_coverage.png beside metrics.json."""
    from mpoxscope.engine.uncertainty import reliability_png, risk_coverage, risk_coverage_png

    write_bytes(out / "reliability.png", reliability_png(probs, targets, title[:90]))
    rc = risk_coverage(probs.max(1), probs.argmax(1) == targets)
    sel = m.get("selective") or {}
    mark = {"test": (sel["coverage"], 1 - sel["accuracy_kept"])} if sel.get("accuracy_kept") is not None else None
    write_bytes(out / "risk_coverage.png", risk_coverage_png({"test": rc}, title[:90], mark))
