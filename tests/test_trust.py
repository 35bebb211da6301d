"""Issue 11 (trust): hostile or mangled inputs, output folders that are not ours, bounded decoding."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
from PIL import Image

from mpoxscope.data.images import ALLOWED_FORMATS, DEFAULT_MAX_SIDE, decode_image, load_image
from mpoxscope.errors import ImageError, MpoxscopeError
from mpoxscope.fileio import OUTPUT_MARKER, check_output_dir, check_output_file, clear_output_dir, mark_output_dir

EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\n"
       b"0 0 moveto 8 8 lineto stroke\nshowpage\n%%EOF\n")


# --- item 4: FIFOs and other non-regular files; item 10: empty files ------------------------------------------

@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_fifo_is_refused_without_opening(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    # In a child process with a timeout: opening a FIFO for reading blocks until a writer appears.
    code = ("from mpoxscope.data.images import load_image\n"
            "from mpoxscope.errors import ImageError\n"
            f"try:\n    load_image({str(fifo)!r})\nexcept ImageError as e:\n    print(e.reason)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "not a regular file" in proc.stdout


def test_empty_file_says_empty(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match="empty.jpg: empty file"):
        load_image(empty)


# --- item 5: one decoder policy -------------------------------------------------------------------------------

def test_eps_named_jpg_never_reaches_the_eps_decoder(tmp_path, monkeypatch):
    from PIL import EpsImagePlugin

    called = []
    original = EpsImagePlugin.EpsImageFile._open

    def spy(self):
        called.append(True)
        return original(self)

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", spy)
    fake = tmp_path / "photo.jpg"
    fake.write_bytes(EPS)
    with pytest.raises(ImageError, match="photo.jpg: not a supported image format"):
        load_image(fake)
    with pytest.raises(ImageError, match="not a supported image format"):
        decode_image(EPS, "upload.jpg")
    assert not called


def test_server_and_cli_share_the_allow_list():
    from mpoxscope.serve import upload

    assert upload.ALLOWED_FORMATS is ALLOWED_FORMATS


# --- item 7: decoded images are reduced at once ---------------------------------------------------------------

def test_large_images_are_reduced_while_decoding(tmp_path, monkeypatch):
    big = tmp_path / "big.jpg"
    Image.new("RGB", (4200, 2100), (200, 120, 90)).save(big, quality=80)
    seen = []
    original = Image.Image.load

    def spy(self):
        out = original(self)
        seen.append(self.size)
        return out

    monkeypatch.setattr(Image.Image, "load", spy)
    img = load_image(big)
    assert max(img.size) <= DEFAULT_MAX_SIDE and img.size[0] == 2 * img.size[1]
    # JPEG draft mode: the decoder itself produced at most half the original width (never 4200 px wide)
    assert seen and max(w for w, _ in seen) <= 2100
    png = tmp_path / "canvas.png"
    Image.new("L", (3000, 1000), 7).save(png)
    assert load_image(png).size == (DEFAULT_MAX_SIDE, round(DEFAULT_MAX_SIDE / 3))
    assert load_image(png, max_side=None).size == (3000, 1000)


# --- items 1 and 2: output folders ----------------------------------------------------------------------------

def test_output_dir_refuses_files_and_foreign_folders(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("x")
    with pytest.raises(MpoxscopeError, match="existing file, not a folder"):
        check_output_dir(f, "train")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "thesis.txt").write_text("years of work")
    with pytest.raises(MpoxscopeError, match=r"victim: folder holds files mpoxscope did not write \(thesis.txt\)"):
        check_output_dir(victim, "evaluate")
    with pytest.raises(MpoxscopeError):
        clear_output_dir(victim, "train")
    assert (victim / "thesis.txt").read_text() == "years of work"
    assert check_output_dir(tmp_path / "new", "train") == tmp_path / "new"


def test_overwrite_removes_only_what_mpoxscope_wrote(tmp_path):
    run = mark_output_dir(tmp_path / "run", "train")
    for name in ("model.json", "best.safetensors", "metrics.jsonl", ".best.safetensors.abc.tmp"):
        (run / name).write_text("old")
    (run / "my_notes.txt").write_text("mine")  # added by the user after the run
    kept = clear_output_dir(run, "train")
    assert kept == ["my_notes.txt"]
    assert sorted(p.name for p in run.iterdir()) == [OUTPUT_MARKER, "my_notes.txt"]


def test_unmarked_old_run_folder_is_accepted(tmp_path):
    old = tmp_path / "old_run"
    old.mkdir()
    for name in ("model.json", "best.safetensors", "last.safetensors", "train_state.json"):
        (old / name).write_text("x")
    assert check_output_dir(old, "train") == old
    ex = tmp_path / "old_explain"
    (ex / "img1").mkdir(parents=True)
    (ex / "img1" / "panel.png").write_bytes(b"x")
    (ex / "index.html").write_text("x")
    assert check_output_dir(ex, "explain") == ex
    photos = tmp_path / "photos"
    (photos / "Mpox").mkdir(parents=True)
    (photos / "Mpox" / "a.png").write_bytes(b"x")  # a data folder is not an explain output
    with pytest.raises(MpoxscopeError, match="did not write"):
        check_output_dir(photos, "explain")


def test_output_file_checks(tmp_path):
    with pytest.raises(MpoxscopeError, match="names a folder"):
        check_output_file(tmp_path, (".onnx",))
    other = tmp_path / "report.docx"
    other.write_text("x")
    with pytest.raises(MpoxscopeError, match="not .onnx"):
        check_output_file(other, (".onnx",))
    assert check_output_file(tmp_path / "m.onnx", (".onnx",)).name == "m.onnx"


def _png_bytes(size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()
