"""A Markdown model card from a run's ``model.json``, its evaluation metrics and (optionally) a data audit.

Every field is optional: anything the files do not record is written as "not recorded", never guessed and
never a crash. Metric files are rendered generically (numbers as a table, per-class dicts as a matrix, a
confusion matrix with class labels), so the card keeps working when the evaluation adds fields.
"""

from __future__ import annotations

import datetime as dt
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mpoxscope.engine import rundir
from mpoxscope.errors import MpoxscopeError
from mpoxscope.fileio import read_json, write_text

CARD_FILE = "MODEL_CARD.md"
DEFAULT_METRICS = Path(rundir.EVALUATION) / rundir.EVAL_METRICS
NOT_RECORDED = "not recorded"

DISCLAIMER = (
    "**Research tool, not a medical device.** This model has not been clinically validated and must not "
    "be used to diagnose, rule out or triage Mpox or any other disease. A suspected infection needs a "
    "clinician and a laboratory test (PCR)."
)

CITATION = (
    "Ali, S. N., Ahmed, M. T., Jahan, T., Paul, J., Sani, S. M. S., Noor, N., Asma, A. N., & Hasan, T. "
    "(2024). A Web-based Mpox Skin Lesion Detection System Using State-of-the-art Deep Learning Models "
    "Considering Racial Diversity. *Biomedical Signal Processing and Control*, 98, 106742. "
    "https://doi.org/10.1016/j.bspc.2024.106742"
)

_TRAIN_KEYS = ("epochs", "batch_size", "lr", "backbone_lr", "weight_decay", "label_smoothing",
               "trainable_stages", "class_balanced", "seed", "precision")
_INTERVAL_LOW = ("low", "lower", "ci_low", "lo")
_INTERVAL_HIGH = ("high", "upper", "ci_high", "hi")
_INTERVAL_POINT = ("value", "mean", "estimate", "point", "median")
_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")

_LIMITATIONS = (
    "**Web-scraped images.** MSLD v2.0 was collected from news portals, websites and case reports: "
    "image quality, framing, watermarks and disease stage vary, and some images may be mislabelled or "
    "duplicated.",
    "**Small dataset.** 755 images of about 524 patients; Cowpox and Measles have fewer than 70 images "
    "each, so per-class metrics have wide confidence intervals and a single split can mislead.",
    "**Skin-tone coverage is limited and unmeasured.** No skin-tone (e.g. Fitzpatrick) labels were used "
    "or evaluated; performance on darker skin, where rashes look different, is unknown.",
    "**Patient-level split.** Images of one patient are kept within one of train/validation/test "
    "(patient IDs from the file names); without this, scores are inflated by near-duplicate photos.",
    "**Official folds.** The five official MSLD v2.0 test sets overlap and do not cover every image, so "
    "the average over folds is not a standard cross-validation estimate.",
    "**Closed set.** The model knows only its classes; any other condition is forced into one of them. "
    "Calibration was fitted on a small validation set and may not transfer to other cameras or "
    "populations.",
)


# ------------------------------------------------------------------------------------------ formatting
def _fmt(v: Any) -> str:
    """One value as Markdown text: floats to 4 decimals, interval dicts as ``x (95% CI lo–hi)``."""
    if v is None:
        return NOT_RECORDED
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.4f}" if abs(v) < 1e4 else f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    if _is_interval(v):
        point = next(v[k] for k in _INTERVAL_POINT if k in v)
        lo = next(v[k] for k in _INTERVAL_LOW if k in v)
        hi = next(v[k] for k in _INTERVAL_HIGH if k in v)
        level = v.get("level", v.get("confidence"))
        ci = ""
        if isinstance(level, (int, float)) and not isinstance(level, bool):
            ci = f"{level * 100 if level <= 1 else level:g}% CI "
        return f"{_fmt(point)} ({ci}{_fmt(lo)}–{_fmt(hi)})"
    text = str(v).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= 200 else text[:197] + "..."


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def _is_interval(v: Any) -> bool:
    return (isinstance(v, dict) and any(k in v for k in _INTERVAL_POINT)
            and any(k in v for k in _INTERVAL_LOW) and any(k in v for k in _INTERVAL_HIGH))


def _is_matrix(v: Any) -> bool:
    return (isinstance(v, list) and bool(v) and all(isinstance(r, list) and len(r) == len(v[0]) for r in v)
            and len(v[0]) > 0 and all(isinstance(x, (int, float)) for r in v for x in r))


def _cell(c: Any) -> str:
    if c is None:  # in a metrics table None means undefined (e.g. AUC of an absent class)
        return "n/a"
    return c.replace("|", "\\|") if isinstance(c, str) else _fmt(c)


def _table(header: Iterable[str], rows: Iterable[Iterable[Any]]) -> str:
    header = list(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _bullets(items: Iterable[tuple[str, Any]]) -> str:
    return "\n".join(f"- **{k}**: {v if isinstance(v, str) else _fmt(v)}" for k, v in items)


#: Keys whose words need more than underscores replaced (the ECE check of ``evaluate``'s metrics.json).
_WORDS = {"ece": "ECE", "n_bins": "bins",
          "ece_check": "test ECE beside a perfectly calibrated model's (same confidences and images)",
          "perfect_mean": "perfectly calibrated model: mean ECE",
          "perfect_p95": "perfectly calibrated model: 95th percentile", "p_value": "P(ECE ≥ observed) for it"}


def _label(key: str) -> str:
    return _WORDS.get(key, key.replace("_", " "))


def _section_dict(meta: dict, key: str) -> dict | None:
    value = meta.get(key)
    return value if isinstance(value, dict) else None


# ------------------------------------------------------------------------------------------ sections
def count_parameters(weights_file: str | os.PathLike) -> int | None:
    """Parameters in a safetensors file (BatchNorm running statistics excluded), read from the header
    only; None when the file is missing or unreadable."""
    try:
        from safetensors import safe_open

        with safe_open(str(weights_file), framework="numpy") as f:
            return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if not k.endswith(_BUFFERS))
    except Exception:  # the card must still render without weights
        return None


def _head_line(head: Any) -> Any:
    """The head's name and the one-line description it registered with (see mpoxscope.registry.HEADS)."""
    from mpoxscope.registry import HEADS

    return f"{head} — {HEADS.get(head).summary}" if isinstance(head, str) and head in HEADS else head


def _model_section(meta: dict, parameters: int | None) -> str:
    model = _section_dict(meta, "model") or {}
    classes = meta.get("classes") or []
    norm = _section_dict(meta, "normalization") or {}
    head = model.get("head")
    size = meta.get("image_size", model.get("image_size"))
    rows: list[tuple[str, Any]] = [
        ("Backbone", model.get("backbone")),
        ("Head", _head_line(head)),
        ("Pretrained weights", meta.get("pretrained_source")),
        ("Input", f"{size} x {size} px RGB, whole image resized (no crop), normalised with mean "
                  f"{norm.get('mean', '?')} and std {norm.get('std', '?')}" if size else None),
        ("Classes", f"{len(classes)}: {', '.join(map(str, classes))}" if classes else None),
        ("Parameters", f"{parameters:,} ({parameters / 1e6:.2f} M)" if parameters else None),
        ("mpoxscope version", meta.get("mpoxscope_version")),
    ]
    if head == "agfn":
        dims = (f"d_model {model['d_model']}, {model['num_heads']} heads, fusion {model.get('fusion', '?')}"
                if "d_model" in model and "num_heads" in model else None)
        rows.insert(2, ("AGFN size", dims))
    train = _section_dict(meta, "train")
    recipe = ", ".join(f"{_label(k)} {_fmt(train[k])}" for k in _TRAIN_KEYS if k in train) if train else ""
    probe = _section_dict(meta, "probe")
    if probe:  # no epochs or learning rates: one logistic-regression fit on the frozen trunk's features
        recipe = (f"linear probe: {probe.get('solver', 'logistic regression')}, class balanced "
                  f"{_fmt((train or {}).get('class_balanced', True))}, on the frozen trunk's pooled features of "
                  f"{len(probe.get('training_views') or [])} views per image; C {probe.get('C')} chosen by "
                  f"validation log-loss")
    rows.append(("Training", recipe or None))
    refit = _section_dict(meta, "refit")
    if refit:
        members = refit.get("members")
        who = (f"members {', '.join(map(str, members))}" if isinstance(members, list) and members
               else f"the network (retrained for {refit['epochs']} epochs)" if "epochs" in refit else "the linear head")
        rows.append(("Refit", f"{who} refit on the training and validation parts after every choice made on "
                              "validation; the validation scores are from before the refit"))
    return "## Model details\n\n" + _bullets(rows)


def _dataset_name(data: dict) -> str | None:
    root = str(data.get("root") or "").lower()
    if "synthetic" in root:
        return "SYNTHETIC generated images (not photographs; results say nothing about real skin disease)"
    if "msld" in root:
        return "MSLD v2.0 (Mpox Skin Lesion Dataset v2.0; 755 images, 6 classes)"
    return str(data["dataset"]) if data.get("dataset") else None


def _data_section(meta: dict) -> str:
    data = _section_dict(meta, "data")
    if data is None:
        return "## Data\n\n" + _bullets([("Training data", NOT_RECORDED)])
    grouping = data.get("patient_grouped", data.get("grouped"))
    if grouping is None and "train" in meta:
        grouping = ("enforced: `mpoxscope train` refuses a split in which one patient ID (from MSLD-style "
                    "file names) appears in two of train/validation/test")
    rows: list[tuple[str, Any]] = [
        ("Dataset", _dataset_name(data)),
        ("Root", data.get("root")),
        ("Split", data.get("split_source", data.get("split", data.get("split_file")))),  # as train describes it
        ("Fold", data.get("fold")),
        ("Patient-level grouping", grouping),
    ]
    shown = {"root", "split", "split_file", "split_source", "n_folds", "fold", "patient_grouped", "grouped",
             "dataset"}
    for key, value in data.items():
        if key in shown:
            continue
        if _is_scalar(value):
            rows.append((_label(key).capitalize(), value))
        elif isinstance(value, dict) and all(_is_scalar(v) for v in value.values()):
            rows.append((_label(key).capitalize(), ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())))
    return "## Data\n\n" + _bullets(rows)


def _metrics_block(metrics: dict, classes: list) -> list[str]:
    """Generic rendering: numbers as one table, string/bool fields as protocol bullets, nested dicts as
    tables, square numeric lists as a confusion matrix."""
    out: list[str] = []
    protocol = [(_label(k).capitalize(), v) for k, v in metrics.items() if isinstance(v, (str, bool))]
    numbers = [(_label(k), v) for k, v in metrics.items()
               if (isinstance(v, (int, float)) and not isinstance(v, bool)) or _is_interval(v)]
    if protocol:
        out.append("Protocol:\n\n" + _bullets(protocol))
    if numbers:
        out.append(_table(["Metric", "Value"], numbers))
    for key, value in metrics.items():
        if _is_interval(value) or _is_scalar(value):
            continue
        title = f"**{_label(key)[:1].upper()}{_label(key)[1:]}**"
        if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            cols = list(dict.fromkeys(c for row in value.values() for c, x in row.items()
                                      if _is_scalar(x) or _is_interval(x)))
            rows = [[str(name)] + [row.get(c) for c in cols] for name, row in value.items()]
            out.append(f"{title}\n\n" + _table([""] + [_label(c) for c in cols], rows))
        elif isinstance(value, dict) and value:
            rows = [(_label(str(k)), v) for k, v in value.items() if _is_scalar(v) or _is_interval(v)]
            if rows:
                out.append(f"{title}\n\n" + _table(["", "Value"], rows))
        elif _is_matrix(value):
            labels = metrics.get("classes") if isinstance(metrics.get("classes"), list) else classes
            n_rows, n_cols = len(value), len(value[0])
            rows_l = [str(c) for c in labels] if len(labels) == n_rows else [str(i) for i in range(n_rows)]
            cols_l = [str(c) for c in labels] if len(labels) == n_cols else [str(i) for i in range(n_cols)]
            rows = [[lab, *r] for lab, r in zip(rows_l, value, strict=True)]
            out.append(f"{title}\n\n" + _table(["true \\ predicted", *cols_l], rows))
        elif isinstance(value, list) and value and key != "classes":  # e.g. unreadable files
            more = f" (first 5 of {len(value)})" if len(value) > 5 else ""
            out.append(f"{title}: {len(value)}{more}: " + "; ".join(_brief(v) for v in value[:5]))
    return out


def _merge_cis(metrics: dict) -> dict:
    """Put each 95 % bootstrap interval of ``metrics["ci"]`` beside its number (accuracy, F1, per-class
    recall/F1), so the card prints ``x (95% CI lo–hi)`` in place; the method becomes a protocol bullet."""
    ci = metrics.get("ci")
    if not isinstance(ci, dict):
        return metrics
    out = {k: v for k, v in metrics.items() if k != "ci"}
    for key, iv in ci.items():
        if _is_interval(iv) and isinstance(out.get(key), (int, float)) and iv.get("low") is not None:
            out[key] = {**iv, "value": out[key]}
    per_class = out.get("per_class")
    if isinstance(per_class, dict):
        out["per_class"] = {c: dict(row) if isinstance(row, dict) else row for c, row in per_class.items()}
        for key in ("recall", "f1"):
            per = ci.get(key)
            for c, iv in (per.items() if isinstance(per, dict) else ()):
                row = out["per_class"].get(c)
                if isinstance(row, dict) and _is_interval(iv) and iv.get("low") is not None and key in row:
                    row[key] = {**iv, "value": row[key]}
    if ci.get("method"):
        out["confidence_intervals"] = f"95% CI: {ci['method']}"
    return out


def _evaluation_section(meta: dict, metrics: dict | None, metrics_source: str | None,
                        figures: list[tuple[str, str]] | None = None, stale_metrics: str | None = None) -> str:
    parts = ["## Evaluation"]
    classes = meta.get("classes") or []
    if metrics:
        parts.append(f"Source: `{metrics_source or 'metrics file'}`.")
        # screening has its own section (its decision rule needs words, not a generic table)
        parts += _metrics_block(_merge_cis({k: v for k, v in metrics.items() if k != "screening"}), classes)
        if figures:
            parts.append(" ".join(f"![{alt}]({path})" for alt, path in figures))
    else:
        parts.append(f"Held-out test metrics: {NOT_RECORDED} "
                     "(run `mpoxscope evaluate RUN`, or pass `--metrics`).")
        if stale_metrics:
            parts.append(f"`{stale_metrics}` was left out: it evaluated other weights than this run's (an earlier "
                         "model trained in the same folder).")
    validation = _section_dict(meta, "validation")
    if validation:
        parts.append("### Validation metrics (model selection)\n\nThese picked the best epoch, so they are "
                     "optimistic; quote the held-out test metrics above.")
        parts += _metrics_block(validation, classes)
    return "\n\n".join(parts)


def _calibration_section(meta: dict) -> str:
    cal = _section_dict(meta, "calibration")
    if not cal:
        return ("## Calibration\n\nCalibration: not recorded. Probabilities are the raw softmax "
                "(temperature 1) and there is no abstain threshold.")
    reached = cal.get("abstain_target_reached")
    target = cal.get("abstain_target_accuracy")
    rows = [
        ("Method", cal.get("method")),
        ("Fitted on", f"{cal.get('fitted_on', NOT_RECORDED)} ({_fmt(cal.get('n'))} images)"),
        ("Temperature", cal.get("temperature")),
        ("ECE before → after", f"{_fmt(cal.get('ece_before'))} → {_fmt(cal.get('ece_after'))} "
                               f"({cal.get('ece_bins', 15)} bins)"),
        ("NLL before → after", f"{_fmt(cal.get('nll_before'))} → {_fmt(cal.get('nll_after'))}"),
        ("Abstain threshold", cal.get("abstain_threshold")),
        ("Abstain target accuracy", target),
        ("Accuracy on kept cases", cal.get("abstain_accuracy_kept")),
        ("Coverage (share kept)", cal.get("abstain_coverage")),
    ]
    if reached is not None:
        missed = (f"no: no threshold kept at least {_fmt(cal.get('abstain_min_coverage'))} of the "
                  f"validation cases at {_fmt(target)} accuracy; the threshold maximises accuracy at that "
                  "coverage instead")
        rows.append(("Target reached", "yes" if reached else missed))
    note = ("Predictions whose top probability is below the abstain threshold should be shown as "
            "\"uncertain\". These numbers are measured on the validation data the temperature and threshold "
            "were fitted on; test-set calibration, if evaluated, is in the Evaluation section.")
    return "## Calibration\n\n" + _bullets(rows) + "\n\n" + note


def _screening_section(meta: dict, metrics: dict | None, screening_png: str | None = None) -> str:
    """The screening rule stored in the run (chosen on validation) and, when evaluated, its test results."""
    scr = _section_dict(meta, "screening")
    if not scr:
        return ("## Screening\n\nScreening rule: not recorded (runs trained with `--screen-class`/"
                "`--mpox-sensitivity` store one; without it the model only names a class or says uncertain).")
    target = scr.get("target_class", "?")
    rows = [
        ("Rule", f"\"possible {target} — refer\" when P({target}) ≥ {_fmt(scr.get('threshold'))}; else "
                 "\"uncertain — refer to a clinician\" below the abstain threshold; else the top class "
                 f"({target} as the top class is referred too)"),
        ("Target sensitivity", f"{_fmt(scr.get('target_sensitivity'))}"
         + (f", met on validation with {_fmt(scr['confidence'])} confidence (one-sided patient-bootstrap lower "
            "bound)" if isinstance(scr.get("confidence"), (int, float)) else " (point estimate on validation)")),
        ("Chosen on", f"{scr.get('source') or NOT_RECORDED} ({_fmt(scr.get('n_validation_target'))} {target} "
                      "images)"),
        ("Validation sensitivity / specificity / referral rate (fit, optimistic)",
         f"{_fmt(scr.get('validation_sensitivity'))} / {_fmt(scr.get('validation_specificity'))} / "
         f"{_fmt(scr.get('validation_referral_rate'))}"),
    ]
    parts = ["## Screening: catch " + str(target) + " first", _bullets(rows)]
    sm = (metrics or {}).get("screening")
    if isinstance(sm, dict) and isinstance(sm.get("sensitivity"), dict):
        from mpoxscope.engine.screening import metrics_markdown

        try:
            lines = metrics_markdown(sm, screening_png)
        except (KeyError, TypeError, ValueError, AttributeError):  # a hand-made --metrics file
            lines = ["Test screening results: present but not in the expected format."]
        parts.append(f"Held-out test ({sm.get('protocol') or metrics.get('protocol') or NOT_RECORDED}):\n\n"
                     + "\n".join(lines))
    else:
        parts.append(f"Test screening results: {NOT_RECORDED} (run `mpoxscope evaluate RUN`).")
    return "\n\n".join(parts)


def _intended_use_section() -> str:
    return "\n".join([
        "## Intended use",
        "",
        "- Research and teaching: studying attention-based classifiers for Mpox and look-alike rashes "
        "(chickenpox, measles, cowpox, hand-foot-and-mouth disease) versus healthy skin, on photographs.",
        "- Not for clinical use, screening, triage or self-diagnosis; not a medical device.",
        "- Out of scope: images that are not skin photographs, other skin diseases (the model always "
        "answers with one of its classes), dermoscopy or histology images.",
    ])


def _brief(v: Any) -> str:
    """One entry of an audit list on one short line."""
    if isinstance(v, dict):
        return _fmt(", ".join(f"{k}={v[k]}" for k in v if _is_scalar(v[k])))
    if isinstance(v, list):
        return _fmt(", ".join(str(x) for x in v))
    return _fmt(v)


def _audit_text(audit: dict | list | None) -> str:
    if audit is None:
        return "Data audit (duplicates, near-duplicates, leakage between splits): not recorded."
    lines = ["**Data audit** (known issues, e.g. duplicate images across splits):", ""]
    items = audit.items() if isinstance(audit, dict) else [("findings", audit)]
    for key, value in items:
        if _is_scalar(value):
            lines.append(f"- {_label(key)}: {_fmt(value)}")
        elif isinstance(value, list):
            shown = "; ".join(_brief(v) for v in value[:5])
            more = f" (first 5 of {len(value)})" if len(value) > 5 else ""
            lines.append(f"- {_label(key)}: {len(value)} entries{more}" + (f": {shown}" if shown else ""))
        elif isinstance(value, dict):
            scalars = [f"{_label(str(k))} {_fmt(v)}" for k, v in value.items() if _is_scalar(v)]
            lines.append(f"- {_label(key)}: " + (", ".join(scalars) or f"{len(value)} entries"))
    return "\n".join(lines)


def _limitations_section(meta: dict, audit: dict | list | None) -> str:
    items = list(_LIMITATIONS)
    data = _section_dict(meta, "data") or {}
    if "synthetic" in str(data.get("root", "")).lower():
        items.insert(0, "**Trained on synthetic images.** This run learned drawn patterns, not disease.")
    if meta.get("note"):
        items.append(f"**Note recorded with the run:** {_fmt(meta['note'])}.")
    return "## Limitations\n\n" + "\n".join(f"- {i}" for i in items) + "\n\n" + _audit_text(audit)


def _licence_section() -> str:
    return "\n".join([
        "## Data licence and attribution",
        "",
        "MSLD v2.0 images are distributed by their authors under a Creative Commons **CC BY-NC** licence "
        "(attribution, non-commercial; treat as share-alike to be safe). The images are not part of this "
        "repository, and a model trained on them inherits the non-commercial restriction. Cite:",
        "",
        f"> {CITATION}",
    ])


# ------------------------------------------------------------------------------------------ public API
def build_card(meta: dict[str, Any], metrics: dict[str, Any] | None = None,
               audit: dict | list | None = None, run_name: str | None = None,
               parameters: int | None = None, metrics_source: str | None = None,
               figures: list[tuple[str, str]] | None = None, screening_png: str | None = None,
               stale_metrics: str | None = None) -> str:
    """The model card as Markdown text; any field missing from the inputs reads "not recorded".
    ``stale_metrics``: a test evaluation left out because it was made from other weights (named in the card)."""
    model = _section_dict(meta, "model") or {}
    name = run_name or (f"{model['backbone']} + {model.get('head', '?')}" if model.get("backbone")
                        else "unnamed model")
    sources = "`model.json`" + (f" and `{metrics_source or 'metrics'}`" if metrics else "")
    header = "\n".join([
        f"# Model card: {name}",
        "",
        f"> {DISCLAIMER}",
        "",
        f"Generated by mpoxscope on {dt.date.today().isoformat()} from {sources}.",
    ])
    sections = [header, _model_section(meta, parameters), _data_section(meta),
                _evaluation_section(meta, metrics, metrics_source, figures, stale_metrics), _calibration_section(meta),
                _screening_section(meta, metrics, screening_png),
                _intended_use_section(), _limitations_section(meta, audit), _licence_section()]
    return "\n\n".join(sections) + "\n"


def _read_json_file(path: Path, what: str) -> Any:
    if not path.is_file():
        raise MpoxscopeError(f"{path}: {what} file not found")
    try:
        return read_json(path)
    except (ValueError, UnicodeDecodeError) as e:
        raise MpoxscopeError(f"{path}: not valid JSON ({e})") from None


def _is_test_evaluation(path: Path) -> bool:
    try:
        protocol = read_json(path).get("protocol", "")
    except (ValueError, UnicodeDecodeError, OSError, AttributeError):
        return False
    return "test" in [part.strip() for part in str(protocol).split(",")]


def find_test_metrics(run_dir: str | os.PathLike) -> Path | None:
    """The test evaluation of a run: ``RUN/evaluation/metrics.json``, ``RUN/eval/metrics.json`` (the README's
    ``evaluate RUN --out RUN/eval``), else the newest ``RUN/*/metrics.json`` whose protocol names the test
    split. A validation evaluation is never taken for the test metrics, nor one of other weights (an earlier
    training in the same folder: see :func:`_of_other_weights`)."""
    sha = rundir.weights_sha256_or_none(run_dir)
    return next((p for p in _test_evaluations(Path(run_dir)) if not _of_other_weights(p, sha)), None)


def _test_evaluations(run_dir: Path) -> list[Path]:
    preferred = [run_dir / DEFAULT_METRICS, run_dir / "eval" / rundir.EVAL_METRICS]
    others = sorted((p for p in run_dir.glob("*/metrics.json") if p not in preferred),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    return [p for p in (*preferred, *others) if p.is_file() and _is_test_evaluation(p)]


def _of_other_weights(metrics_path: Path, run_sha256: str | None) -> bool:
    """Whether an evaluation records a model digest (``evaluate`` does since session 20) other than the run's
    now — ``train --overwrite`` replaces the weights but keeps an ``evaluation/`` folder it did not write."""
    try:
        recorded = read_json(metrics_path).get("model_sha256")
    except (ValueError, UnicodeDecodeError, OSError, AttributeError):
        return False
    return None not in (recorded, run_sha256) and recorded != run_sha256


def _choose_metrics(run_dir: Path, metrics_file: str | os.PathLike | None) -> tuple[Path | None, Path | None]:
    """(the metrics file the card reports, a test evaluation left out because it is of other weights). An
    explicit ``metrics_file`` of other weights is refused: a card must not claim another model's numbers."""
    sha = rundir.weights_sha256_or_none(run_dir)
    path = Path(metrics_file) if metrics_file else find_test_metrics(run_dir) or run_dir / DEFAULT_METRICS
    if _of_other_weights(path, sha):
        if metrics_file:
            raise MpoxscopeError(f"{path}: metrics of other weights than {run_dir}'s (an earlier model); "
                                 f"evaluate this run again with 'mpoxscope evaluate {run_dir}'")
        return None, path
    if not metrics_file and not path.is_file():
        return path, next((p for p in _test_evaluations(run_dir) if _of_other_weights(p, sha)), None)
    return path, None


def _check_metrics(path: Path, metrics: Any) -> None:
    """Refuse a metrics file the card would print nonsense from ("Accuracy: abc"), in one line."""
    if not isinstance(metrics, dict):
        raise MpoxscopeError(f"{path}: expected a JSON object of metrics")
    for key in ("accuracy", "f1_macro", "precision_macro", "recall_macro", "f1_weighted"):
        v = metrics.get(key)
        if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                  and 0 <= v <= 1):
            raise MpoxscopeError(f"{path}: field {key!r} must be a number from 0 to 1 (got {str(v)[:40]!r})")


def write_card(run_dir: str | os.PathLike, out: str | os.PathLike | None = None,
               metrics_file: str | os.PathLike | None = None,
               audit_file: str | os.PathLike | None = None) -> Path:
    """Write the card for ``run_dir`` to ``out`` (default ``RUN/MODEL_CARD.md``).

    Metrics come from ``metrics_file`` or the run's test evaluation (:func:`find_test_metrics`); ``audit_file``
    is an optional JSON data audit whose findings are listed under Limitations.
    """
    from mpoxscope.engine.checkpoint import read_meta  # imports torch: keep `mpoxscope --help` fast

    run_dir = Path(run_dir)
    meta = read_meta(run_dir)
    metrics_path, stale = _choose_metrics(run_dir, metrics_file)
    metrics = None
    if metrics_path is not None and (metrics_file or metrics_path.is_file()):
        metrics = _read_json_file(metrics_path, "metrics")
        _check_metrics(metrics_path, metrics)
    audit = _read_json_file(Path(audit_file), "audit") if audit_file else None
    if audit is not None and not isinstance(audit, dict):
        raise MpoxscopeError(f"{audit_file}: expected the JSON object `mpoxscope audit` writes (audit.json)")
    out_path = Path(out) if out else run_dir / CARD_FILE
    # The evaluation's reliability diagram and risk-coverage curve, linked relative to the card.
    figures = [(alt, os.path.relpath(metrics_path.parent / name, out_path.parent))
               for alt, name in (("test reliability diagram", "reliability.png"),
                                 ("test risk-coverage curve", "risk_coverage.png"))
               if metrics is not None and (metrics_path.parent / name).is_file()]
    png = metrics_path.parent / "screening_roc_pr.png" if metrics_path is not None else None
    screening_png = os.path.relpath(png, out_path.parent) if metrics is not None and png.is_file() else None
    text = build_card(meta, metrics, audit, run_name=run_dir.resolve().name,
                      parameters=count_parameters(rundir.weights_file(run_dir)),
                      metrics_source=str(metrics_path) if metrics is not None else None, figures=figures,
                      screening_png=screening_png, stale_metrics=str(stale) if stale else None)
    return write_text(out_path, text)
