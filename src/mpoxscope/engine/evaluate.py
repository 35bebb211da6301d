"""Evaluation of a trained run on one split: metrics.json, report.md, confusion-matrix PNG, predictions.csv."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import torch

from mpoxscope.data.images import load_image
from mpoxscope.data.samples import SampleSet
from mpoxscope.engine.metrics import classification_metrics
from mpoxscope.engine.predict import Predictor
from mpoxscope.errors import ImageError, MpoxscopeError
from mpoxscope.fileio import write_bytes, write_json, write_text


def predict_split(predictor: Predictor, data: SampleSet, indices, tta: bool = False, batch_size: int = 16,
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
            probs.append(predict_with_tta(predictor, images) if tta else predictor.predict_images(images))
            targets.extend(ys)
    k = len(predictor.classes)
    return (np.concatenate(probs) if probs else np.zeros((0, k))), np.asarray(targets, dtype=int), names, failed


def predict_with_tta(predictor: Predictor, images) -> np.ndarray:
    """Mean probability over the identity, horizontal and vertical flips (lesions have no orientation)."""
    batch = predictor.preprocess(images)
    outs = []
    for dims in ((), (3,), (2,)):
        x = torch.flip(batch, dims) if dims else batch
        outs.append(torch.softmax(predictor.logits(x) / predictor.temperature, 1).numpy())
    return np.mean(outs, axis=0)


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
        f"| accuracy | {m['accuracy']:.4f} |",
        f"| macro precision / recall / F1 | {m['precision_macro']:.4f} / {m['recall_macro']:.4f} / "
        f"{m['f1_macro']:.4f} |",
        f"| weighted precision / recall / F1 | {m['precision_weighted']:.4f} / {m['recall_weighted']:.4f} / "
        f"{m['f1_weighted']:.4f} |",
        f"| ROC-AUC (one-vs-rest, macro) | {_fmt(m['roc_auc_ovr_macro'])} |",
    ]
    cal = m.get("calibration")
    if cal:
        lines.append(f"| ECE before / after temperature ({cal['temperature']:.3f}) | {_fmt(cal['ece_before'])} / "
                     f"{_fmt(cal['ece_after'])} |")
        if cal.get("abstain_threshold") is not None:
            lines.append(f"| abstain below p={cal['abstain_threshold']:.3f}: coverage / accuracy on kept | "
                         f"{_fmt(cal.get('coverage'))} / {_fmt(cal.get('accuracy_kept'))} |")
    lines += ["", "## Per class", "", "| class | precision | recall | F1 | ROC-AUC | support |",
              "|---|---|---|---|---|---|"]
    for c in classes:
        pc = m["per_class"][c]
        lines.append(f"| {c} | {pc['precision']:.3f} | {pc['recall']:.3f} | {pc['f1']:.3f} | "
                     f"{_fmt(pc.get('roc_auc'))} | {pc['support']} |")
    lines += ["", "## Confusion matrix (rows true, columns predicted)", "", "![confusion matrix](confusion_matrix.png)",
              "", "| true \\ pred | " + " | ".join(classes) + " |", "|---" * (len(classes) + 1) + "|"]
    for c, row in zip(classes, m["confusion_matrix"]):
        lines.append(f"| {c} | " + " | ".join(str(v) for v in row) + " |")
    if m.get("failed_files"):
        lines += ["", "## Unreadable files (excluded)", ""] + [f"- {f}" for f in m["failed_files"]]
    return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def evaluate(predictor: Predictor, data: SampleSet, indices, out_dir: str | Path, protocol: str,
             tta: bool = False) -> dict:
    """Predict ``indices`` of ``data``, write metrics.json, report.md, confusion_matrix.png and predictions.csv
    to ``out_dir``; return the metrics dict (which carries its ``protocol``)."""
    out = Path(out_dir)
    probs, targets, names, failed = predict_split(predictor, data, indices, tta=tta)
    if len(targets) == 0:
        raise MpoxscopeError(f"no readable images to evaluate ({protocol})")
    m = classification_metrics(targets, probs, predictor.classes)
    m["protocol"] = protocol + (", test-time augmentation (flips)" if tta else "")
    m["failed_files"] = failed
    m["calibration"] = _calibration_metrics(predictor, probs, targets)
    write_json(out / "metrics.json", m)
    write_text(out / "report.md", markdown_report(m, m["protocol"], predictor.meta))
    write_bytes(out / "confusion_matrix.png", confusion_png(m["confusion_matrix"], predictor.classes, m["protocol"]))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["filename", "true", "predicted", "confidence", *predictor.classes])
    for name, t, p in zip(names, targets, probs):
        w.writerow([name, predictor.classes[t], predictor.classes[int(p.argmax())], f"{p.max():.4f}",
                    *(f"{v:.4f}" for v in p)])
    write_text(out / "predictions.csv", buf.getvalue())
    return m


def _calibration_metrics(predictor: Predictor, probs: np.ndarray, targets: np.ndarray) -> dict | None:
    cal = predictor.meta.get("calibration") or {}
    try:
        from mpoxscope.engine.calibration import expected_calibration_error, selective_metrics
    except ImportError:
        return None
    t = float(cal.get("temperature", 1.0))
    # probs are already tempered by t; undo it to report the uncalibrated ECE too
    logp = np.log(np.clip(probs, 1e-12, 1)) * t
    raw = np.exp(logp - logp.max(1, keepdims=True))
    raw /= raw.sum(1, keepdims=True)
    out = {"temperature": t, "ece_before": float(expected_calibration_error(raw, targets)),
           "ece_after": float(expected_calibration_error(probs, targets)),
           "abstain_threshold": cal.get("abstain_threshold")}
    if cal.get("abstain_threshold") is not None:
        out.update(selective_metrics(probs, targets, float(cal["abstain_threshold"])))
    return out
