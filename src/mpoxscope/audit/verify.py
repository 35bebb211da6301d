"""Confirm a near-duplicate candidate by aligning the two pictures and correlating their fine detail.

Why: the pHash minimised over 140 flip/crop variants finds re-encoded, resized, cropped, flipped and recoloured
copies, but it only sees the 8x8 lowest frequencies. Distinct photos with the same coarse layout (one dark lesion
in the middle of plain skin, a hand on a dark background) then reach the distances of true copies (on MSLD v2.0:
distinct pairs from 6 bits, copies up to 10). A second hash of the same kind did not separate them: the dHash
(imagehash, 128 bits) of the aligned pair was 22-35 bits for true copies and 25-80 for distinct photos.

What separates them is texture: pores, hair and lesion borders are the same pixels in a copy and unrelated in
another photo. The candidate's variant gives a coarse alignment; a search over scale (x and y separately, +-12 %,
refined to 1.5 %) and shift refines it; the score is the normalised cross-correlation of the high-pass (image minus
its Gaussian blur) of the grey pictures at 64x64: ~1 for a copy, ~0.1-0.5 for distinct photos. The median over a
3x3 grid of tiles is returned too: two photos that share a single strong structure (a black privacy bar) correlate
overall but not tile by tile.
"""

from __future__ import annotations

import numpy as np
import scipy.fft
from PIL import Image
from scipy.ndimage import gaussian_filter
from scipy.signal import correlate

from mpoxscope.audit.hashing import Window, flipped

#: Working resolution of the aligned comparison, the border left out of the template, and the search margin
#: around the coarse alignment (pixels at that resolution).
SIDE = 64
BORDER = 8
MARGIN = 8
#: Relative scales tried in x and in y around the coarse window, then refinement steps around the best.
SCALES = (0.88, 0.94, 1.0, 1.06, 1.12)
FINE_STEPS = (0.03, 0.015)
#: Gaussian sigma (pixels at SIDE) of the blur subtracted to keep the fine detail.
HIGHPASS_SIGMA = 2.0
TILES = 3
FFT_SIDE = 96


def _highpass(a: np.ndarray) -> np.ndarray:
    return a - gaussian_filter(a, HIGHPASS_SIGMA, mode="reflect")


def _box_sum(x: np.ndarray, h: int, w: int) -> np.ndarray:
    """Sum of every h x w window of x: (H-h+1, W-w+1)."""
    c = np.zeros((x.shape[0] + 1, x.shape[1] + 1))
    c[1:, 1:] = x
    c = c.cumsum(0).cumsum(1)
    return c[h:, w:] - c[:-h, w:] - c[h:, :-w] + c[:-h, :-w]


class _Template:
    """A zero-mean template with its spectrum precomputed at FFT_SIDE (a search region is at most
    SIDE + 2 * MARGIN + 1 pixels, so circular correlation at FFT_SIDE has no wrap-around at valid positions)."""

    def __init__(self, template: np.ndarray) -> None:
        self.shape = template.shape
        self.t = template - template.mean()
        self.norm = float(np.sqrt((self.t * self.t).sum()))
        self.spectrum = np.conj(scipy.fft.rfft2(self.t, s=(FFT_SIDE, FFT_SIDE)))

    def correlate(self, search: np.ndarray) -> np.ndarray:
        h, w = self.shape
        out_h, out_w = search.shape[0] - h + 1, search.shape[1] - w + 1
        if max(search.shape) > FFT_SIDE:
            return correlate(search, self.t, mode="valid", method="fft")
        full = scipy.fft.irfft2(scipy.fft.rfft2(search, s=(FFT_SIDE, FFT_SIDE)) * self.spectrum,
                                s=(FFT_SIDE, FFT_SIDE))
        return full[:out_h, :out_w]


def ncc_map(search: np.ndarray, template: np.ndarray | _Template) -> np.ndarray:
    """Normalised cross-correlation of ``template`` (h, w) at every position inside ``search`` (H, W):
    (H-h+1, W-w+1), in [-1, 1]; zeros when the template is flat."""
    tpl = template if isinstance(template, _Template) else _Template(template)
    h, w = tpl.shape
    t_norm = tpl.norm
    if t_norm < 1e-6:
        return np.zeros((search.shape[0] - h + 1, search.shape[1] - w + 1))
    num = tpl.correlate(search)
    s1 = _box_sum(search, h, w)
    var = np.maximum(_box_sum(search * search, h, w) - s1 * s1 / (h * w), 0.0)
    return np.clip(num / (t_norm * np.sqrt(var) + 1e-6), -1.0, 1.0)


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    den = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 1e-6 else 0.0


def tile_median(patch: np.ndarray, template: np.ndarray, tiles: int = TILES) -> float:
    """Median over a tiles x tiles grid of the correlation of ``patch`` and ``template`` (same shape)."""
    h, w = template.shape
    ys, xs = np.linspace(0, h, tiles + 1).astype(int), np.linspace(0, w, tiles + 1).astype(int)
    return float(np.median([_ncc(patch[ys[i]:ys[i + 1], xs[j]:xs[j + 1]], template[ys[i]:ys[i + 1], xs[j]:xs[j + 1]])
                            for i in range(tiles) for j in range(tiles)]))


def aligned_correlation(grey_a: Image.Image, grey_b: Image.Image, window: Window) -> tuple[float, float]:
    """How well ``grey_a`` (mode L) matches the part of ``grey_b`` that ``window`` (flip, then crop) selects.

    Returns (overall, tile median): the high-pass normalised cross-correlation at the best scale and shift, and the
    median of its 3x3 tiles there; both in [-1, 1]."""
    a = np.asarray(grey_a.resize((SIDE, SIDE), Image.LANCZOS), dtype=np.float64)
    template = _highpass(a)[BORDER:SIDE - BORDER, BORDER:SIDE - BORDER]
    th, tw = template.shape
    tpl = _Template(template)
    img = flipped(grey_b, window.flip)
    w, h = img.size
    x0, y0, x1, y1 = window.box
    cx, cy = (x0 + x1) / 2 * w, (y0 + y1) / 2 * h

    def match(sx: float, sy: float) -> tuple[float, np.ndarray | None]:
        """Best correlation with b's window scaled by (sx, sy), and the matching patch of b."""
        bw, bh = (x1 - x0) * sx * w, (y1 - y0) * sy * h  # source pixels that map onto SIDE
        px, py = bw / SIDE, bh / SIDE
        box = (max(0.0, cx - bw / 2 - MARGIN * px), max(0.0, cy - bh / 2 - MARGIN * py),
               min(float(w), cx + bw / 2 + MARGIN * px), min(float(h), cy + bh / 2 + MARGIN * py))
        size = (max(1, round((box[2] - box[0]) / px)), max(1, round((box[3] - box[1]) / py)))
        if size[0] < tw or size[1] < th:
            return -1.0, None
        region = _highpass(np.asarray(img.resize(size, Image.LANCZOS, box=box), dtype=np.float64))
        ncc = ncc_map(region, tpl)
        y, x = np.unravel_index(int(ncc.argmax()), ncc.shape)
        return float(ncc[y, x]), region[y:y + th, x:x + tw]

    tried = {(sx, sy): match(sx, sy) for sx in SCALES for sy in SCALES}
    best = max(tried, key=lambda k: tried[k][0])
    for step in FINE_STEPS:
        bx, by = best
        for key in ((bx + dx, by + dy) for dx in (-step, 0.0, step) for dy in (-step, 0.0, step)):
            if key not in tried:
                tried[key] = match(*key)
        best = max(tried, key=lambda k: tried[k][0])
    overall, patch = tried[best]
    return overall, (tile_median(patch, template) if patch is not None else -1.0)
