"""Write an :class:`AuditReport` as ``audit.json``, ``audit.md`` and ``audit.html`` (thumbnails embedded as small
base64 JPEGs; no image is copied)."""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path

from mpoxscope.audit.duplicates import DuplicatePair
from mpoxscope.audit.report import AuditReport
from mpoxscope.data.images import load_image
from mpoxscope.data.splits import SPLITS
from mpoxscope.errors import ImageError
from mpoxscope.fileio import write_json, write_text


def pair_crossings(report: AuditReport) -> dict[tuple[int, int], list[str]]:
    """(a, b) -> ["fold1: train/test", ...] for every pair that crosses the parts of a fold."""
    out: dict[tuple[int, int], list[str]] = {}
    for f in report.folds:
        for d in f.duplicate_leaks:
            a, b = sorted((d.split_a, d.split_b), key=SPLITS.index)
            out.setdefault((d.pair.a, d.pair.b), []).append(f"{f.fold}: {a}/{b}")
    return out


def _md_table(header: list[str], rows: list[list[object]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return lines + [""]


def _pair_row(report: AuditReport, p: DuplicatePair, crossings: dict[tuple[int, int], list[str]]) -> list[object]:
    d = report.pair_dict(p)
    return [d["file_a"], d["file_b"], f"{d['class_a']} / {d['class_b']}", f"{d['patient_a']} / {d['patient_b']}",
            p.kind, p.distance, f"{p.correlation:.2f}", "; ".join(crossings.get((p.a, p.b), [])) or "-"]


def to_markdown(report: AuditReport) -> str:
    """The audit as Markdown: protocol, classes, image properties, duplicates, leaks per fold."""
    d = report.to_dict()
    proto, summ = d["protocol"], d["summary"]
    crossings = pair_crossings(report)
    lines = [
        "# Dataset audit", "",
        f"- Dataset: `{proto['dataset']}`",
        f"- Split file: `{proto['split_file']}`" if proto["split_file"] else "- Split file: none (no leak check)",
        f"- Near duplicates: pHash distance <= {proto['threshold_bits']} bits of 64 (min over flips/crops), "
        f"confirmed by aligned correlation >= {proto['min_correlation']}",
        f"- mpoxscope {proto['mpoxscope_version']}, {proto['created']}, {proto['seconds']} s", "",
        "## Summary", "",
        f"{summ['images']} images, {summ['patients']} patients, {summ['classes']} classes, "
        f"{summ['unreadable']} unreadable. Duplicate pairs: {summ['identical_file_pairs']} identical files, "
        f"{summ['identical_pixel_pairs']} identical pixels, {summ['near_duplicate_pairs']} near duplicates "
        f"({summ['pairs_across_patients']} across patient IDs, {summ['pairs_across_classes']} across classes).", "",
        "## Classes", "",
    ]
    lines += _md_table(["class", "images", "patients", "unreadable"],
                       [[c["name"], c["images"], c["patients"], c["unreadable"]] for c in d["classes"]])
    lines += ["## Images", ""]
    sizes = list(d["image_sizes"].items())
    more = f" and {len(sizes) - 10} other sizes" if len(sizes) > 10 else ""
    lines += [f"- Sizes (most common): {', '.join(f'{k} ({v})' for k, v in sizes[:10])}{more}"]
    if d["shorter_side"]:
        s = d["shorter_side"]
        lines += [f"- Shorter side: min {s['min']}, median {s['median']}, max {s['max']} px"]
    lines += [f"- Modes: {', '.join(f'{k} ({v})' for k, v in d['modes'].items())}",
              f"- Formats: {', '.join(f'{k} ({v})' for k, v in d['formats'].items())}", ""]
    if d["unreadable"]:
        lines += ["### Unreadable files", ""]
        lines += _md_table(["file", "class", "reason"], [[u["file"], u["label"], u["reason"]] for u in d["unreadable"]])
    lines += ["## Duplicate pairs", ""]
    if report.pairs:
        lines += _md_table(["file a", "file b", "classes", "patients", "kind", "pHash bits", "correlation",
                            "crosses splits"], [_pair_row(report, p, crossings) for p in report.pairs])
    else:
        lines += ["None found.", ""]
    if report.folds:
        lines += ["## Leaks per fold", ""]
        lines += _md_table(
            ["fold", "train/val/test", "patient leaks", "duplicate leaks", "of which across patients",
             "leaked test images"],
            [[f.fold, "/".join(str(f.sizes[s]) for s in ("train", "validation", "test")), len(f.patient_leaks),
              len(f.duplicate_leaks), len(f.cross_patient_duplicate_leaks), len(f.leaked_test)]
             for f in report.folds])
        for f in report.folds:
            if not f.has_leaks:
                continue
            lines += [f"### {f.fold}", ""]
            for p in f.patient_leaks:
                where = "; ".join(f"{s}: {', '.join(p.files[s])}" for s in p.splits)
                lines += [f"- patient `{p.patient}` in {' and '.join(p.splits)} ({where})"]
            for dl in f.duplicate_leaks:
                a, b = report.data.samples[dl.pair.a], report.data.samples[dl.pair.b]
                lines += [f"- {dl.pair.kind} pair `{a.filename}` ({dl.split_a}) ~ `{b.filename}` ({dl.split_b}), "
                          f"{dl.pair.distance} bits, correlation {dl.pair.correlation:.2f}"
                          + (" (same patient)" if dl.same_patient else "")]
            lines += [""]
    return "\n".join(lines)


def _thumb_data_uri(path: Path, side: int) -> str | None:
    try:
        img = load_image(path)
    except ImageError:
        return None
    img.thumbnail((side, side))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=75)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
.pairs{display:flex;flex-wrap:wrap;gap:12px}.pair{border:1px solid #ccc;border-radius:6px;padding:8px;width:250px}
.pair.leak{border-color:#c00;background:#fff4f4}.pair img{width:116px;height:116px;object-fit:contain;
background:#eee}.pair .imgs{display:flex;gap:6px}.pair .meta{font-size:12px;margin-top:4px;word-break:break-all}
.missing{width:116px;height:116px;background:#eee;display:flex;align-items:center;justify-content:center}
.bad{color:#c00;font-weight:bold}"""


def to_html(report: AuditReport) -> str:
    """A self-contained page: the summary tables, then each suspicious pair with two thumbnails (pairs that
    cross a split first, at most ``config.html_pairs``)."""
    e = html.escape
    d = report.to_dict()
    proto, summ = d["protocol"], d["summary"]
    crossings = pair_crossings(report)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>mpoxscope audit</title>"
             f"<style>{_CSS}</style></head><body><h1>Dataset audit</h1>",
             f"<p>Dataset <code>{e(proto['dataset'])}</code>; split file "
             f"<code>{e(str(proto['split_file']))}</code>; near duplicates: pHash &le; {proto['threshold_bits']} "
             f"bits (min over flips/crops) and aligned correlation &ge; {proto['min_correlation']}; "
             f"mpoxscope {e(proto['mpoxscope_version'])}, {e(proto['created'])}.</p>",
             f"<p>{summ['images']} images, {summ['patients']} patients, {summ['unreadable']} unreadable; "
             f"{summ['identical_file_pairs']} identical-file, {summ['identical_pixel_pairs']} identical-pixel and "
             f"{summ['near_duplicate_pairs']} near-duplicate pairs.</p>",
             "<h2>Classes</h2><table><tr><th>class</th><th>images</th><th>patients</th><th>unreadable</th></tr>"]
    parts += [f"<tr><td>{e(c['name'])}</td><td>{c['images']}</td><td>{c['patients']}</td><td>{c['unreadable']}</td>"
              "</tr>" for c in d["classes"]]
    parts.append("</table>")
    if d["unreadable"]:
        parts.append("<h2>Unreadable files</h2><ul>")
        parts += [f"<li><code>{e(u['file'])}</code>: {e(u['reason'])}</li>" for u in d["unreadable"]]
        parts.append("</ul>")
    if report.folds:
        parts.append("<h2>Leaks per fold</h2><table><tr><th>fold</th><th>train/val/test</th><th>patient leaks</th>"
                     "<th>duplicate leaks</th><th>across patients</th><th>leaked test images</th></tr>")
        for f in report.folds:
            cls = " class='bad'" if f.has_leaks else ""
            parts.append(f"<tr{cls}><td>{e(f.fold)}</td><td>{f.sizes['train']}/{f.sizes['validation']}/"
                         f"{f.sizes['test']}</td><td>{len(f.patient_leaks)}</td><td>{len(f.duplicate_leaks)}</td>"
                         f"<td>{len(f.cross_patient_duplicate_leaks)}</td><td>{len(f.leaked_test)}</td></tr>")
        parts.append("</table>")
        leaks = [(f.fold, p) for f in report.folds for p in f.patient_leaks]
        if leaks:
            parts.append("<h3>Patients in more than one part</h3><ul>")
            parts += [f"<li>{e(fold)}: <code>{e(p.patient)}</code> in {e(' and '.join(p.splits))}</li>"
                      for fold, p in leaks]
            parts.append("</ul>")
    ordered = sorted(report.pairs, key=lambda p: (not crossings.get((p.a, p.b)), p.distance))
    shown = ordered[:report.config.html_pairs]
    parts.append(f"<h2>Duplicate pairs ({len(report.pairs)}; {len(shown)} shown, split-crossing first)</h2>"
                 "<div class='pairs'>")
    for p in shown:
        cross = crossings.get((p.a, p.b), [])
        imgs = []
        for i in (p.a, p.b):
            uri = _thumb_data_uri(report.data.samples[i].path, report.config.thumb_side)
            imgs.append(f"<img src='{uri}' alt=''>" if uri else "<div class='missing'>unreadable</div>")
        sa, sb = report.data.samples[p.a], report.data.samples[p.b]
        parts.append(
            f"<div class='pair{' leak' if cross else ''}'><div class='imgs'>{''.join(imgs)}</div><div class='meta'>"
            f"<b>{e(sa.filename)}</b> ({e(sa.label)}, {e(sa.group)})<br><b>{e(sb.filename)}</b> ({e(sb.label)}, "
            f"{e(sb.group)})<br>{e(p.kind)}, {p.distance} bits, correlation {p.correlation:.2f}<br>{e(p.match)}"
            + (f"<br><span class='bad'>crosses {e('; '.join(cross))}</span>" if cross else "") + "</div></div>")
    parts.append("</div></body></html>")
    return "\n".join(parts)


def write_audit(report: AuditReport, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``audit.json``, ``audit.md`` and ``audit.html`` into ``out_dir`` (atomically); returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return {
        "json": write_json(out / "audit.json", report.to_dict()),
        "markdown": write_text(out / "audit.md", to_markdown(report)),
        "html": write_text(out / "audit.html", to_html(report)),
    }
