"""Per-image fingerprints: SHA-256 of the file and of the decoded pixels, and perceptual hashes that survive
re-encoding, resizing, small crops, flips and mild colour changes.

The perceptual hash is the DCT hash (pHash) of :func:`imagehash.phash`: grey, resize to 32x32, 2-D DCT, the 8x8
lowest frequencies compared with their median -> 64 bits. A plain pHash already ignores re-encoding, resizing and
colour changes, but a 10 % crop moves it as far as an unrelated photo (measured on MSLD: up to 26 of 64 bits). So
each image also gets *variant* hashes: its four flips, and for each flip 32x32 windows cut from the image resized to
34x34 and 36x36 (windows of 94 % and 89 % of the image at every integer offset). Cropping after resizing is the same
as resizing a crop, so all variants come from three resizes and one batched DCT instead of ~140 calls to
:func:`imagehash.phash` (which costs ~1 ms each); the identity variant is bit-for-bit ``imagehash.phash``.
Two images are compared as ``min(d(base_a, variants_b), d(variants_a, base_b))``, so either may be the crop.

Hashes are cached in memory by (path, size, mtime): auditing again, or finding duplicates once per fold, does not
decode the images twice.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import scipy.fft
from PIL import Image

from mpoxscope.data.images import ALLOWED_FORMATS, decode_image
from mpoxscope.errors import ImageError

#: pHash geometry (as imagehash.phash defaults): hash_size x hash_size bits from a (4*hash_size)^2 DCT.
HASH_SIZE = 8
DCT_SIZE = 4 * HASH_SIZE
#: Side lengths the image is resized to before 32x32 windows are cut at every offset: 32 (the whole image),
#: 34 (94 % windows, 3x3 offsets) and 36 (89 % windows, 5x5 offsets). Chosen by measurement, see duplicates.py.
WINDOW_SIDES = (32, 34, 36)
#: Flips in variant order: none, horizontal, vertical, both (= 180-degree rotation).
FLIPS = ("none", "horizontal", "vertical", "both")
#: Grey thumbnails kept for the aligned check of candidate pairs: longest side in pixels.
THUMB_SIDE = 128


@dataclass(frozen=True)
class Window:
    """One variant: a flip, then the square window (fractions of width/height) that was hashed."""

    flip: str
    box: tuple[float, float, float, float]

    @property
    def is_identity(self) -> bool:
        return self.flip == "none" and self.box == (0.0, 0.0, 1.0, 1.0)

    def describe(self) -> str:
        parts = [] if self.flip == "none" else [f"{self.flip} flip"]
        x0, y0, x1, y1 = self.box
        if (x1 - x0) < 1.0:
            parts.append(f"{100 * (x1 - x0):.0f}% crop at ({100 * x0:.0f}%, {100 * y0:.0f}%)")
        return ", ".join(parts) or "as is"


def _windows_one_flip() -> list[tuple[int, int, int]]:
    return [(side, x, y) for side in WINDOW_SIDES for y in range(side - DCT_SIZE + 1)
            for x in range(side - DCT_SIZE + 1)]


def variant_windows() -> list[Window]:
    """The variants in hash order (flip-major); index 0 is the image as is."""
    out = []
    for flip in FLIPS:
        for side, x, y in _windows_one_flip():
            out.append(Window(flip, (x / side, y / side, (x + DCT_SIZE) / side, (y + DCT_SIZE) / side)))
    return out


N_VARIANTS = len(FLIPS) * len(_windows_one_flip())


def _flip_array(a: np.ndarray, flip: str) -> np.ndarray:
    if flip in ("horizontal", "both"):
        a = a[..., :, ::-1]
    if flip in ("vertical", "both"):
        a = a[..., ::-1, :]
    return a


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """(..., B) bool -> (..., ceil(B/64)) uint64, bit order as ``np.packbits`` (big-endian within a word)."""
    nbytes = -(-bits.shape[-1] // 8)
    packed = np.packbits(bits, axis=-1)
    words = -(-nbytes // 8)
    padded = np.zeros((*packed.shape[:-1], words * 8), dtype=np.uint8)
    padded[..., :nbytes] = packed
    return padded.view(">u8").astype(np.uint64)


def phash_variants(grey: Image.Image) -> np.ndarray:
    """pHash bits of every variant of a grey (mode L) image: (N_VARIANTS, 64) bool; row 0 == imagehash.phash."""
    per_flip = []
    for side in WINDOW_SIDES:
        # imagehash.phash resizes with LANCZOS ('ANTIALIAS') from the full image; do exactly the same
        arr = np.asarray(grey.resize((side, side), Image.LANCZOS), dtype=np.float64)
        k = side - DCT_SIZE + 1
        view = np.lib.stride_tricks.sliding_window_view(arr, (DCT_SIZE, DCT_SIZE))  # (k, k, 32, 32): [y, x]
        per_flip.append(view.reshape(k * k, DCT_SIZE, DCT_SIZE))
    windows = np.concatenate(per_flip)  # (W, 32, 32), ordered side, y, x as _windows_one_flip
    # flipping a window of the image = the mirrored window of the flipped image, so flip the windows' pixels
    # and re-order them to the windows of the flipped image
    stack = np.concatenate([_flip_windows(windows, flip) for flip in FLIPS])
    dct = scipy.fft.dct(scipy.fft.dct(stack, axis=1), axis=2)[:, :HASH_SIZE, :HASH_SIZE]
    low = dct.reshape(len(stack), -1)
    return low > np.median(low, axis=1, keepdims=True)


def _flip_windows(windows: np.ndarray, flip: str) -> np.ndarray:
    """Windows of the flipped image, in the same (side, y, x) order as the windows of the image."""
    if flip == "none":
        return windows
    out = []
    start = 0
    for side in WINDOW_SIDES:
        k = side - DCT_SIZE + 1
        block = windows[start:start + k * k].reshape(k, k, DCT_SIZE, DCT_SIZE)
        block = _flip_array(block, flip)  # pixels within each window
        if flip in ("horizontal", "both"):
            block = block[:, ::-1]  # window at x in the flipped image is the window at k-1-x, mirrored
        if flip in ("vertical", "both"):
            block = block[::-1]
        out.append(block.reshape(k * k, DCT_SIZE, DCT_SIZE))
        start += k * k
    return np.concatenate(out)


def flipped(img: Image.Image, flip: str) -> Image.Image:
    """``img`` flipped as a variant names it (one of FLIPS)."""
    if flip in ("horizontal", "both"):
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    if flip in ("vertical", "both"):
        img = img.transpose(Image.FLIP_TOP_BOTTOM)
    return img


def crop_variant(img: Image.Image, window: Window) -> Image.Image:
    """The part of ``img`` that a variant hashed (flip, then crop)."""
    img = flipped(img, window.flip)
    w, h = img.size
    x0, y0, x1, y1 = window.box
    return img.crop((round(x0 * w), round(y0 * h), round(x1 * w), round(y1 * h)))


@dataclass(frozen=True)
class ImageRecord:
    """What the audit knows about one file. ``error`` is set (and the pixel fields are empty) when the file
    could not be decoded; ``phash`` is (N_VARIANTS,) uint64 (variant 0 = the image as is)."""

    path: Path
    file_size: int
    sha256: str
    error: str | None = None
    width: int = 0
    height: int = 0
    mode: str = ""
    format: str = ""
    pixel_sha256: str = ""
    phash: np.ndarray | None = None
    thumb: Image.Image | None = None  # grey, longest side THUMB_SIDE, for the aligned check (verify.py)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def phash_hex(self) -> str:
        """The plain pHash (identity variant) as imagehash writes it."""
        if self.phash is None:
            return ""
        return f"{int(self.phash[0]):016x}"


def _pixel_digest(rgb: Image.Image) -> str:
    arr = np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))
    h = hashlib.sha256(f"{arr.shape}".encode())
    h.update(arr.tobytes())
    return h.hexdigest()


def _header(data: bytes) -> tuple[int, int, str, str]:
    """Size, mode and format as stored in the file (before conversion to RGB)."""
    try:
        with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as img:  # the one decoder policy
            return img.width, img.height, img.mode, img.format or ""
    except Exception:  # PIL raises many types for junk; decode_image below gives the one-line reason
        return 0, 0, "", ""


#: Largest file the audit reads into memory (it hashes the bytes, then decodes them under the pixel limit).
MAX_FILE_BYTES = 256 * 2**20


def compute_record(path: str | os.PathLike) -> ImageRecord:
    """Read, decode and fingerprint one file; a bad file gives a record with ``error`` set, never an exception."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:  # read whole below: bound the memory one file can take
            return ImageRecord(path, size, "", error=f"file too large ({size / 2**20:.0f} MiB; an image file of more "
                                                     f"than {MAX_FILE_BYTES // 2**20} MiB is not read)")
        data = path.read_bytes()
    except OSError as e:
        return ImageRecord(path, 0, "", error=f"cannot read file ({e.strerror or e})")
    sha = hashlib.sha256(data).hexdigest()
    width, height, mode, fmt = _header(data)
    try:
        rgb = decode_image(data, str(path))
    except ImageError as e:
        return ImageRecord(path, len(data), sha, error=e.reason, width=width, height=height, mode=mode, format=fmt)
    grey = rgb.convert("L")
    bits = phash_variants(grey)
    thumb = grey.copy()
    thumb.thumbnail((THUMB_SIDE, THUMB_SIDE), Image.LANCZOS)
    phash = pack_bits(bits)[:, 0]
    phash.setflags(write=False)  # records are shared through the cache
    return ImageRecord(path, len(data), sha, None, width, height, mode, fmt, _pixel_digest(rgb), phash, thumb)


@lru_cache(maxsize=16384)
def _cached_record(path: str, size: int, mtime_ns: int) -> ImageRecord:
    return compute_record(path)


def image_record(path: str | os.PathLike) -> ImageRecord:
    """:func:`compute_record`, cached in memory while the file's size and modification time are unchanged."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        return compute_record(p)
    return _cached_record(str(p.resolve()), st.st_size, st.st_mtime_ns)


def image_records(paths: Sequence[str | os.PathLike]) -> list[ImageRecord]:
    return [image_record(p) for p in paths]


def clear_cache() -> None:
    _cached_record.cache_clear()
