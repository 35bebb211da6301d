"""Atomic writes: a file is either the old version or the complete new one, never half-written."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` in one rename. The new file's
    bytes, then the rename, are flushed to disk first (fsync): a process kill never needed it, but after a power
    cut or a machine crash a rename can otherwise reach the disk before the data, leaving an empty checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o644)  # mkstemp creates 0600; results are meant to be shared
        _fsync(tmp_path)
        os.replace(tmp_path, path)
        _fsync(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to disk; a file system that cannot (some network and
    Windows folders refuse to open a folder) is left to its own guarantees."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line and flush it to disk, so a killed run keeps every finished record."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=_json_default) + "\n")
        f.flush()
        os.fsync(f.fileno())


def safe_name(text: str, fallback: str, limit: int | None = None) -> str:
    """``text`` as a plain file or folder name: no separators, no leading dots (``..`` cannot climb out of the
    folder it is joined to), no characters a file system or a URL would choke on, at most ``limit`` characters;
    ``fallback`` when nothing is left."""
    import re

    name = re.sub(r"[^A-Za-z0-9._-]+", "_", text).lstrip(".")
    return (name[:limit] if limit else name).rstrip(".") or fallback


def printable(text: str | os.PathLike) -> str:
    """``text`` (a path, or a message naming one) as one printable line of valid UTF-8: bytes of a file name that
    are not UTF-8 become ``\\xNN`` and control characters ``\\n``, ``\\x1b``..., so a hostile file name can
    neither crash a strict UTF-8 stream (a terminal, a CSV, a matplotlib title) nor forge a second line."""
    text = os.fsdecode(text) if isinstance(text, bytes) else os.fspath(text)
    try:  # undecodable bytes of a file name arrive as surrogates: back to those bytes, shown as \xNN
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "surrogatepass")
    text = raw.decode("utf-8", "backslashreplace")
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def csv_cell(text: str) -> str:
    """A text cell a spreadsheet shows as text: one that starts like a formula (``= + - @``, tab, CR) gets a
    leading apostrophe (OWASP's advice against CSV injection: a file named ``=HYPERLINK(...).jpg``)."""
    return f"'{text}" if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# --- Output folders: refuse what is not ours before any work, and delete only what mpoxscope wrote ------------

#: Hidden marker written into every output folder mpoxscope creates; it names the commands that wrote there.
OUTPUT_MARKER = ".mpoxscope-output.json"

#: Files the operating system drops into folders; they never make a folder "someone else's".
_OS_JUNK = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})

#: Per command: names (``fnmatch`` patterns) of the entries it writes into its ``--out`` folder — exact names
#: wherever the command writes fixed ones, so that ``--overwrite`` can never match a user's ``weights.pt`` or
#: ``features/``.
_SCREENING = ("screening.json", "screening.md", "screening_roc_pr.png")
OUTPUT_PATTERNS: dict[str, tuple[str, ...]] = {
    "train": ("model.json", "train_state.json", "metrics.jsonl", "best.safetensors", "last.safetensors", "resume.pt",
              "feature_cache.safetensors", "validation_probs.npz", "members", "refit", "model.onnx", "model.int8.onnx",
              "model.int8.fallback.onnx", "model.pixels.onnx", "MODEL_CARD.md", *_SCREENING),
    "evaluate": ("metrics.json", "report.md", "predictions.csv", "confusion_matrix.png", "reliability.png",
                 "risk_coverage.png"),
    "cv": ("cv_report.md", "cv_summary.json", "per_fold.png", "confusion_matrix_pooled.png", "reliability.png",
           "risk_coverage.png", "fold[0-9]*", *_SCREENING),
    "explain": ("index.html", "summary.json", "faithfulness.md", "faithfulness.json"),
    "audit": ("audit.json", "audit.md", "audit.html"),
    "protocols": ("protocols.json", "protocols.md", "protocols.png", "work", "augmented"),
    "screen": _SCREENING,
    "demo": ("synthetic_data", "run", "evaluation", "README.md"),
}

#: An unmarked folder (written before markers existed) counts as mpoxscope's only if it holds one of these JSON
#: files with these keys; anything else unmarked and not empty is refused, so ``--overwrite`` never touches it.
_SIGNATURES: dict[str, frozenset[str]] = {"model.json": frozenset({"format_version", "classes", "model"}),
                                          "cv_summary.json": frozenset({"per_fold", "summary", "protocol"}),
                                          "metrics.json": frozenset({"n_images", "confusion_matrix", "per_class"}),
                                          "summary.json": frozenset({"images"})}  # explain

#: Sub-folders a command writes whose names are free (explain: one folder per image): (a file each one holds,
#: patterns every file in it matches).
_SUBFOLDERS: dict[str, tuple[str, tuple[str, ...]]] = {"explain": ("panel.png", ("*.png", "*.npy"))}


def _is_ours(entry: Path, kind: str) -> bool:
    import fnmatch

    name = entry.name
    if name in _OS_JUNK or name == OUTPUT_MARKER or fnmatch.fnmatch(name, ".*.tmp"):  # atomic_path leftovers
        return True
    if any(fnmatch.fnmatch(name, p) for p in OUTPUT_PATTERNS.get(kind, ())):
        return True
    if kind in _SUBFOLDERS and entry.is_dir() and not entry.is_symlink():
        required, inner = _SUBFOLDERS[kind]
        files = [f for f in entry.rglob("*") if not f.is_dir()]
        return (entry / required).is_file() and all(
            any(fnmatch.fnmatch(f.name, p) for p in (*inner, ".*.tmp")) for f in files)
    return False


def is_marked_output(path: str | os.PathLike) -> bool:
    return (Path(path) / OUTPUT_MARKER).is_file()


def check_output_dir(path: str | os.PathLike, kind: str) -> Path:
    """Refuse ``--out`` up front (one line) unless it is new, empty, or an output folder mpoxscope wrote.

    Call before any expensive work. Refused: an existing file, a symlink or other non-folder, and a folder that
    holds files mpoxscope did not write (it would be silently mixed with results, and ``--overwrite`` must never
    touch it).
    """
    from mpoxscope.errors import MpoxscopeError

    out = Path(path)
    if out.is_symlink() and not out.exists():
        raise MpoxscopeError(f"{out}: --out is a broken symbolic link")
    if not out.exists():
        return out
    if not out.is_dir():
        raise MpoxscopeError(f"{out}: --out names an existing file, not a folder; choose a new folder name")
    if is_marked_output(out):
        _refuse_clash(out, kind)
        return out
    # Any command's outputs are fine (``evaluate RUN --out RUN`` of a run made before markers existed).
    entries = [e for e in out.iterdir() if e.name not in _OS_JUNK]
    foreign = sorted(e.name for e in entries if not any(_is_ours(e, k) for k in (kind, *OUTPUT_PATTERNS)))
    if entries and not foreign and not _has_signature(out):
        foreign = sorted(e.name for e in entries)  # our names, but nothing says mpoxscope wrote them
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise MpoxscopeError(f"{out}: folder holds files mpoxscope did not write ({foreign[0]}{more}); "
                             f"choose a new or empty folder for --out")
    return out


def _refuse_clash(out: Path, kind: str) -> None:
    """Refuse a folder another command wrote when ``kind`` would replace that command's own files there (e.g.
    ``evaluate --out CV`` would replace the cv's pooled ``reliability.png``; ``ensemble --out CV`` its screening
    files); commands whose names do not overlap may share a folder (``evaluate RUN --out RUN``)."""
    from mpoxscope.errors import MpoxscopeError

    try:
        others = [c for c in read_json(out / OUTPUT_MARKER).get("commands", []) if c != kind]
    except (ValueError, OSError, AttributeError):
        return  # a damaged marker only ever says "mpoxscope wrote here"
    mine = set(OUTPUT_PATTERNS.get(kind, ()))
    for other in others:
        if {kind, other} == {"cv", "screen"}:  # `screen` rewrites a cv's screening files by the cv's own function
            continue
        shared = sorted(mine & set(OUTPUT_PATTERNS.get(other, ())))
        if shared:
            raise MpoxscopeError(f"{out}: holds a `{other}` output whose files `{kind}` would replace "
                                 f"({', '.join(shared[:3])}); choose another --out")


def _has_signature(folder: Path) -> bool:
    for name, keys in _SIGNATURES.items():
        path = folder / name
        try:
            if path.is_file() and path.stat().st_size < 50_000_000 and keys <= set(read_json(path)):
                return True
        except (ValueError, OSError, TypeError):  # not JSON, unreadable, or not an object
            continue
    return False


def mark_output_dir(path: str | os.PathLike, kind: str) -> Path:
    """Create ``path`` (after :func:`check_output_dir`) and record in its marker that ``kind`` writes there."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    marker = out / OUTPUT_MARKER
    info: dict[str, Any] = {"tool": "mpoxscope", "commands": []}
    if marker.is_file():
        try:
            info = {**info, **read_json(marker)}
        except (ValueError, OSError):
            pass  # a damaged marker is rewritten; it only ever says "mpoxscope wrote here"
    if kind not in info["commands"]:
        info["commands"] = [*info["commands"], kind]
        write_json(marker, info)
    return out


def clear_output_dir(path: str | os.PathLike, kind: str) -> list[str]:
    """Delete what command ``kind`` writes in ``path`` (for ``--overwrite``); return the names of entries kept.

    Only entries matching the command's output patterns are removed, and only in a folder that
    :func:`check_output_dir` accepts; anything else (a user's own file) stays where it is.
    """
    import shutil

    out = check_output_dir(path, kind)
    if not out.is_dir():
        return []
    kept = []
    for entry in sorted(out.iterdir()):
        if entry.name == OUTPUT_MARKER or entry.name in _OS_JUNK or not _is_ours(entry, kind):
            if entry.name != OUTPUT_MARKER:
                kept.append(entry.name)
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    return kept


def check_output_file(path: str | os.PathLike, suffixes: tuple[str, ...],
                      ours: Callable[[Path], bool] | None = None) -> Path:
    """Refuse an output FILE up front: a folder, a wrong suffix, or an existing file that ``ours`` does not
    recognise as mpoxscope's (an earlier card or export of the same kind may be replaced; nothing else is)."""
    from mpoxscope.errors import MpoxscopeError

    out = Path(path)
    if out.is_dir():
        raise MpoxscopeError(f"{out}: --out names a folder; give a file name ending in {' or '.join(suffixes)}")
    if out.exists() and out.suffix.lower() not in suffixes:
        raise MpoxscopeError(f"{out}: --out names an existing file that is not {' or '.join(suffixes)}; "
                             "it would be replaced — choose another name")
    if out.suffix.lower() not in suffixes:
        raise MpoxscopeError(f"{out}: --out must end in {' or '.join(suffixes)}")
    if (out.exists() or out.is_symlink()) and not (out.is_file() and ours is not None and _safe(ours, out)):
        raise MpoxscopeError(f"{out}: an existing file mpoxscope did not write; it would be replaced — choose "
                             "another name with --out")
    return out


def _safe(predicate: Callable[[Path], bool], path: Path) -> bool:
    try:
        return bool(predicate(path))
    except Exception:  # an unreadable or malformed file is simply not recognised as ours
        return False


def is_model_card(path: Path) -> bool:
    """A Markdown file written by ``mpoxscope card`` (its title line and "Generated by mpoxscope" line)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        head = f.read(4096).splitlines()
    return bool(head) and head[0].startswith("# Model card: ") and any(
        line.startswith("Generated by mpoxscope on ") for line in head[1:10])
