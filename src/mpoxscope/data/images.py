"""Robust image loading: EXIF orientation, any mode to RGB, one clear error per bad file."""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mpoxscope.errors import ImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".avif"})

#: The one decoder policy, for files and uploads alike: Pillow may only identify these formats, so exotic decoders
#: (EPS -> Ghostscript, etc.) are never reached, whatever a file is named. (JPEG also opens phones' MPO files.)
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "AVIF", "BMP", "GIF", "TIFF")


def _pixel_limit(cap: int = 64_000_000, bytes_per_pixel: int = 5, share: int = 16) -> int:
    """Largest image (pixels) one decode may hold: 64 MP covers any phone photo; on a small machine, so that one
    full-size decode (about ``bytes_per_pixel`` at its peak) uses at most 1/``share`` of physical memory."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: keep the cap
        return cap
    return max(4_000_000, min(cap, ram // (bytes_per_pixel * share)))


#: Refuse images above this many pixels (decompression bombs); see :func:`_pixel_limit`.
MAX_PIXELS = _pixel_limit()

#: Decoded images are shrunk at once so their longer side is at most this (several times any model's input size,
#: 224-448 px): a 64 MP photo then costs 12 MB as RGB, not 192 MB. High enough that what a model sees does not
#: change for ordinary photos (1 of MSLD v2.0's 755 images is larger). ``None`` keeps full resolution.
DEFAULT_MAX_SIDE = 2048

def is_image_file(path: str | os.PathLike) -> bool:
    name = Path(path).name
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode (L, P, LA, RGBA, CMYK, I;16, I, F) to 8-bit RGB; transparency goes on white."""
    img = ImageOps.exif_transpose(img) or img
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(arr.astype(np.uint8), mode="L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _check_file(path: Path, name: str) -> None:
    """Refuse what is not a regular, non-empty file before opening it (a FIFO would block the open forever)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ImageError(name, "file not found") from None
    except OSError as e:
        raise ImageError(name, f"cannot read file ({e.strerror or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(name, "is a directory, not an image")
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(name, "not a regular file (a FIFO, socket or device); not opened")
    if st.st_size == 0:
        raise ImageError(name, "empty file")


def _shrink(img: Image.Image, max_side: int | None) -> Image.Image:
    """Reduce a large image right after (JPEG: during) decoding, before any full-size copy is made."""
    if max_side is None or max(img.size) <= max_side:
        img.load()  # decode now so truncation surfaces here, not mid-epoch
        return img
    if img.mode in ("P", "1"):  # palette/bilevel resizing is nearest-neighbour only: convert first
        img.load()
        img = img.convert("RGBA" if img.mode == "P" else "L")
    # A JPEG decoder can scale by 1/2, 1/4 or 1/8 while decoding (draft mode; never below max_side), so the
    # full-size picture is never held; the EXIF orientation stays in img.info and is applied later by to_rgb.
    w, h = img.size
    scale = max_side / max(w, h)
    img.draft(None, (max(1, int(w * scale)), max(1, int(h * scale))))  # the box the result must still cover
    img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return img


def _open(source: str | os.PathLike | bytes, name: str, max_side: int | None = DEFAULT_MAX_SIDE) -> Image.Image:
    if isinstance(source, (bytes, bytearray)):
        fp = io.BytesIO(source)
    else:
        _check_file(Path(source), name)
        fp = source
    try:
        with Image.open(fp, formats=ALLOWED_FORMATS) as img:
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise ImageError(name, f"image too large ({w}x{h} pixels; limit {MAX_PIXELS:,})")
            return to_rgb(_shrink(img, max_side))
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(name, "file not found") from None
    except IsADirectoryError:
        raise ImageError(name, "is a directory, not an image") from None
    except UnidentifiedImageError:
        raise ImageError(name, f"not a supported image format (accepted: {', '.join(ALLOWED_FORMATS)})") from None
    except Image.DecompressionBombError as e:
        raise ImageError(name, f"image too large ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(name, f"cannot decode image ({e})") from None


def load_image(path: str | os.PathLike, max_side: int | None = DEFAULT_MAX_SIDE) -> Image.Image:
    """Open ``path`` as an 8-bit RGB image, EXIF-rotated, longer side shrunk to ``max_side`` (``None``: full size).

    Only :data:`ALLOWED_FORMATS` are decoded, whatever the file is named. Raises :class:`ImageError` naming the
    file (not found, not a regular file, empty, unsupported format, too many pixels, undecodable)."""
    return _open(path, str(path), max_side)


def decode_image(data: bytes, name: str = "upload", max_side: int | None = DEFAULT_MAX_SIDE) -> Image.Image:
    """Decode image bytes (format sniffed from content, never from a name, within :data:`ALLOWED_FORMATS`)."""
    if not data:
        raise ImageError(name, "empty file")
    return _open(bytes(data), name, max_side)


def check_images(paths: list[Path]) -> list[ImageError]:
    """Verify every file decodes; returns the errors (empty list when all are fine)."""
    errors: list[ImageError] = []
    for p in paths:
        try:
            load_image(p)
        except ImageError as e:
            errors.append(e)
    return errors
