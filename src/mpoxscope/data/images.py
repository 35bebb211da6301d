"""Robust image loading: EXIF orientation, any mode to RGB, one clear error per bad file."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mpoxscope.errors import ImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})

#: Refuse images above this many pixels (decompression bombs); 64 MP covers any phone photo.
MAX_PIXELS = 64_000_000


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


def _open(source: str | os.PathLike | bytes, name: str) -> Image.Image:
    fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    try:
        with Image.open(fp) as img:
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise ImageError(name, f"image too large ({w}x{h} pixels; limit {MAX_PIXELS:,})")
            img.load()  # decode now so truncation surfaces here, not mid-epoch
            return to_rgb(img)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(name, "file not found") from None
    except IsADirectoryError:
        raise ImageError(name, "is a directory, not an image") from None
    except UnidentifiedImageError:
        raise ImageError(name, "not a recognised image format") from None
    except Image.DecompressionBombError as e:
        raise ImageError(name, f"image too large ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(name, f"cannot decode image ({e})") from None


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open ``path`` as an 8-bit RGB image, EXIF-rotated. Raises :class:`ImageError` naming the file."""
    return _open(path, str(path))


def decode_image(data: bytes, name: str = "upload") -> Image.Image:
    """Decode image bytes (format sniffed from content, never from a name) to RGB."""
    if not data:
        raise ImageError(name, "empty file")
    return _open(bytes(data), name)


def check_images(paths: list[Path]) -> list[ImageError]:
    """Verify every file decodes; returns the errors (empty list when all are fine)."""
    errors: list[ImageError] = []
    for p in paths:
        try:
            load_image(p)
        except ImageError as e:
            errors.append(e)
    return errors
