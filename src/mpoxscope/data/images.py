"""Robust image loading: EXIF orientation, any mode to RGB, one clear error per bad file."""

from __future__ import annotations

import io
import os
import stat
import warnings
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

# Pillow warns (two lines, with its source path) about images over ~89 MP before our one-line refusal of anything
# over MAX_PIXELS (<= 64 MP), and about damaged TIFF/EXIF blocks it decodes anyway: the refusal or the result is
# what a user needs, so these warnings are silenced once, process-wide (a per-call catch_warnings is not
# thread-safe, and the server decodes in threads).
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")

#: Decoded images are shrunk at once so their longer side is at most this (several times any model's input size,
#: 224-448 px): a 64 MP photo then costs 12 MB as RGB, not 192 MB. High enough that what a model sees does not
#: change for ordinary photos (1 of MSLD v2.0's 755 images is larger). ``None`` keeps full resolution.
DEFAULT_MAX_SIDE = 2048

def is_image_file(path: str | os.PathLike) -> bool:
    name = Path(path).name
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS


#: EXIF orientation -> the transpose that shows the picture upright (as ImageOps.exif_transpose does).
_ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
                5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                8: Image.Transpose.ROTATE_90}


def to_rgb(img: Image.Image, orientation: int | None = None) -> Image.Image:
    """Convert any PIL mode (L, P, LA, RGBA, CMYK, I;16, I, F) to 8-bit RGB; transparency goes on white.

    The picture is turned upright by its EXIF orientation, or by ``orientation`` when given (read before the
    image was reduced into a new one)."""
    if orientation is None:
        img = ImageOps.exif_transpose(img) or img
    elif orientation in _ORIENTATION:
        img = img.transpose(_ORIENTATION[orientation])
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


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1))
    except Exception:  # a damaged EXIF block only loses the rotation, never the image
        return 1


_REDUCIBLE = frozenset({"L", "LA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "I", "F"})


def _reduce_in_strips(img: Image.Image, factor: int, rows: int = 64) -> Image.Image:
    """``img.reduce(factor)`` (box average) strip by strip: Pillow's own reduce/resize of RGBA or LA first makes
    a full-size premultiplied copy, which doubles the peak memory of a large transparent PNG."""
    w, h = img.size
    out = Image.new(img.mode, (-(-w // factor), -(-h // factor)))
    step = factor * rows
    for top in range(0, h, step):
        strip = img.crop((0, top, w, min(h, top + step)))
        out.paste(strip.reduce(factor), (0, top // factor))
    return out


def _shrink(img: Image.Image, max_side: int | None) -> Image.Image:
    """Reduce a large image right after (JPEG: during) decoding, holding at most one full-size copy."""
    if max_side is None or max(img.size) <= max_side:
        img.load()  # decode now so truncation surfaces here, not mid-epoch
        return img
    # A JPEG decoder can scale by 1/2, 1/4 or 1/8 while decoding (draft mode; never below the target box), so
    # the full-size picture is never held.
    w, h = img.size
    scale = max_side / max(w, h)
    img.draft(None, (max(1, int(w * scale)), max(1, int(h * scale))))
    img.load()
    if img.mode in ("P", "1") or img.mode.startswith("I;16"):  # modes Pillow cannot reduce (well): convert
        img = img.convert({"P": "RGBA", "1": "L"}.get(img.mode, "I"))
    factor = max(img.size) // max_side
    if factor >= 2 and img.mode in _REDUCIBLE:
        img = _reduce_in_strips(img, factor)
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
            orientation = _orientation(img)  # read first: reducing makes a new image without the EXIF block
            return to_rgb(_shrink(img, max_side), orientation)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(name, "file not found") from None
    except IsADirectoryError:
        raise ImageError(name, "is a directory, not an image") from None
    except UnidentifiedImageError:
        raise ImageError(name, f"not a supported image format (accepted: {', '.join(ALLOWED_FORMATS)})") from None
    except Image.DecompressionBombError:  # over Pillow's own error limit (~179 MP), far over ours
        raise ImageError(name, f"image too large (more than {MAX_PIXELS:,} pixels)") from None
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
