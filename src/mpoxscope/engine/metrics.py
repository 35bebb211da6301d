"""Classification metrics from scikit-learn, as one JSON-ready dict."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    log_loss,
    precision_recall_fscore_support,
    roc_auc_score,
)

from mpoxscope.engine.uncertainty import bootstrap_ci, classification_cis, fmt_ci  # noqa: F401 (public here)


def classification_metrics(targets: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict:
    """Metrics for ``targets`` (N,) int class indices and ``probs`` (N, K) probabilities.

    Returns accuracy, macro and weighted precision/recall/F1, per-class precision/recall/F1/support, one-vs-rest
    ROC-AUC (macro over the classes present, per class), log-loss, the confusion matrix (rows = true, columns =
    predicted, in ``classes`` order) and the number of images.
    """
    targets = np.asarray(targets, dtype=int)
    probs = np.asarray(probs, dtype=np.float64)
    probs = probs / np.clip(probs.sum(axis=1, keepdims=True), 1e-12, None)  # float32 softmax rows drift from 1
    k = len(classes)
    labels = list(range(k))
    preds = probs.argmax(axis=1)
    out: dict = {"n_images": int(len(targets)), "accuracy": float(accuracy_score(targets, preds))}
    for avg in ("macro", "weighted"):
        # macro over the classes present in the targets, so an absent class does not count as F1 = 0
        present = sorted(set(targets.tolist())) if avg == "macro" else labels
        p, r, f, _ = precision_recall_fscore_support(targets, preds, labels=present, average=avg, zero_division=0)
        out[f"precision_{avg}"], out[f"recall_{avg}"], out[f"f1_{avg}"] = float(p), float(r), float(f)
    p, r, f, s = precision_recall_fscore_support(targets, preds, labels=labels, average=None, zero_division=0)
    out["per_class"] = {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                            "support": int(s[i])} for i, c in enumerate(classes)}
    out["roc_auc_ovr_macro"], per_class_auc = _roc_auc(targets, probs, k)
    for i, c in enumerate(classes):
        out["per_class"][c]["roc_auc"] = per_class_auc.get(i)
    out["log_loss"] = float(log_loss(targets, probs, labels=labels)) if len(targets) else None
    out["confusion_matrix"] = confusion_matrix(targets, preds, labels=labels).tolist()
    out["classes"] = list(classes)
    return out


def _roc_auc(targets: np.ndarray, probs: np.ndarray, k: int) -> tuple[float | None, dict[int, float]]:
    per_class = {}
    for i in range(k):
        positives = targets == i
        if 0 < positives.sum() < len(targets):  # AUC needs both positives and negatives
            per_class[i] = float(roc_auc_score(positives, probs[:, i]))
    macro = float(np.mean(list(per_class.values()))) if per_class else None
    return macro, per_class


def summary_line(m: dict, protocol: str) -> str:
    """One human line: protocol first, so no number travels without it."""
    auc = m.get("roc_auc_ovr_macro")
    auc_txt = f", ROC-AUC {auc:.3f}" if auc is not None else ""
    ci = m.get("ci") or {}
    acc, f1 = (f" (95% CI {ci[k]['low']:.4f}–{ci[k]['high']:.4f})" if (ci.get(k) or {}).get("low") is not None
               else "" for k in ("accuracy", "f1_macro"))
    return (f"[{protocol}] n={m['n_images']}: accuracy {m['accuracy']:.4f}{acc}, macro-F1 {m['f1_macro']:.4f}{f1}, "
            f"macro precision {m['precision_macro']:.4f}, macro recall {m['recall_macro']:.4f}{auc_txt}")
