"""A static ``index.html`` gallery of explained images, grouped by predicted class, most confident first."""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import quote

from mpoxscope.fileio import write_json, write_text


@dataclass
class GalleryEntry:
    """One input file. Paths in ``panel`` and ``files`` (method or kind -> file) are relative to the
    gallery folder. ``folder_label``: the class named by the file's folder (``images/<class>/x.jpg``), if any."""

    source: str
    label: str | None = None
    confidence: float | None = None
    target: str | None = None
    probabilities: dict[str, float] = field(default_factory=dict)
    panel: str | None = None
    files: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    folder_label: str | None = None


def sort_entries(entries: Sequence[GalleryEntry], classes: Sequence[str] = ()) -> list[GalleryEntry]:
    """Explained entries by class (the run's class order, then alphabetical) and falling confidence;
    failed ones last."""
    order = {c: i for i, c in enumerate(classes)}

    def key(e: GalleryEntry):
        return (order.get(e.label or "", len(order)), e.label or "", -(e.confidence or 0.0), e.source)

    failed = [e for e in entries if e.error is not None]
    return sorted((e for e in entries if e.error is None), key=key) + failed


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
h2{border-bottom:1px solid #ccc;padding-bottom:.2em}
.grid{display:flex;flex-wrap:wrap;gap:14px}
.card{border:1px solid #ddd;border-radius:6px;padding:8px;max-width:980px}
.card img{max-width:100%;height:auto;display:block}
.cap{font-size:13px;margin-top:4px}.cap a{margin-right:.6em}
.err{color:#a00}.note{color:#555;font-size:13px}
"""


def _href(path: str) -> str:
    return html.escape(quote(path.replace(os.sep, "/")), quote=True)


def _card(e: GalleryEntry) -> str:
    name = html.escape(Path(e.source).name)
    conf = f"{e.confidence:.1%}" if e.confidence is not None else ""
    target = "" if e.target in (None, e.label) else f" &middot; explaining <b>{html.escape(e.target)}</b>"
    if e.folder_label is not None:
        cls = "" if e.folder_label == e.label else ' class="err"'
        target += f" &middot; <span{cls}>folder: {html.escape(e.folder_label)}</span>"
    links = " ".join(f'<a href="{_href(p)}">{html.escape(k)}</a>' for k, p in e.files.items())
    img = f'<a href="{_href(e.panel)}"><img loading="lazy" src="{_href(e.panel)}" alt="{name}"></a>' \
        if e.panel else ""
    return (f'<div class="card">{img}<div class="cap"><b>{name}</b>: {html.escape(e.label or "")} {conf}'
            f'{target}<br>{links}</div></div>')


def render_gallery(entries: Sequence[GalleryEntry], title: str, classes: Sequence[str] = (),
                   note: str = "") -> str:
    """The gallery page as HTML text."""
    ordered = sort_entries(entries, classes)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    if note:
        parts.append(f'<p class="note">{html.escape(note)}</p>')
    current = None
    for e in ordered:
        if e.error is not None:
            continue
        if e.label != current:
            if current is not None:
                parts.append("</div>")
            current = e.label
            count = sum(1 for x in ordered if x.error is None and x.label == current)
            parts.append(f"<h2>{html.escape(current or '')} ({count})</h2><div class='grid'>")
        parts.append(_card(e))
    if current is not None:
        parts.append("</div>")
    failed = [e for e in ordered if e.error is not None]
    if failed:
        parts.append(f"<h2>Not explained ({len(failed)})</h2><ul>")
        parts += [f'<li class="err">{html.escape(e.source)}: {html.escape(e.error or "")}</li>'
                  for e in failed]
        parts.append("</ul>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_gallery(out_dir: str | os.PathLike, entries: Sequence[GalleryEntry], title: str,
                  classes: Sequence[str] = (), note: str = "", extra: dict | None = None) -> Path:
    """Write ``index.html`` and ``summary.json`` (every entry, plus ``extra``) into ``out_dir``."""
    out = Path(out_dir)
    write_json(out / "summary.json", {**(extra or {}), "images": [asdict(e) for e in
                                                                   sort_entries(entries, classes)]})
    return write_text(out / "index.html", render_gallery(entries, title, classes, note))
