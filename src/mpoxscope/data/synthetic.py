"""A synthetic six-class 'skin lesion' image set, generated in code, for the demo and tests.

SYNTHETIC: these images are drawn shapes on skin-coloured backgrounds, not photographs of disease. Each class has
its own lesion pattern (size, count, colour, ring/centre structure), with random skin tone, lighting, position and
blur, so a model must learn the pattern, not the background. Two to three images share a synthetic "patient"
(file names ``SYN<code>_<patient>_<image>.png``) so grouped splits can be exercised.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from mpoxscope.data.classes import CANONICAL_CLASSES

# Per class: (count range, radius range as a fraction of size, lesion RGB, centre RGB or None, ring width or 0)
_PATTERNS: dict[str, tuple] = {
    "Mpox": ((3, 7), (0.05, 0.08), (235, 225, 200), (110, 70, 60), 0),  # umbilicated pustules, dark centre
    "Chickenpox": ((8, 16), (0.025, 0.045), (215, 90, 90), (250, 235, 225), 0),  # small red vesicles, clear top
    "Measles": ((40, 80), (0.008, 0.018), (190, 60, 60), None, 0),  # dense fine red rash
    "Cowpox": ((1, 2), (0.11, 0.16), (60, 35, 30), (20, 10, 10), 0),  # one or two large black eschars
    "HFMD": ((4, 9), (0.035, 0.06), (240, 240, 235), None, 3),  # grey-white oval vesicles, red ring
    "Healthy": ((0, 0), (0.0, 0.0), (0, 0, 0), None, 0),
}

_SKIN_TONES = [(255, 224, 196), (234, 192, 160), (198, 145, 110), (160, 110, 80), (112, 72, 50), (80, 52, 38)]


def _skin(rng: np.random.Generator, size: int) -> Image.Image:
    base = np.array(_SKIN_TONES[rng.integers(len(_SKIN_TONES))], dtype=np.float32)
    base *= rng.uniform(0.85, 1.15)
    yy, xx = np.mgrid[0:size, 0:size] / size
    light = 1.0 + 0.25 * (rng.uniform(-1, 1) * xx + rng.uniform(-1, 1) * yy - 0.5)
    noise = rng.normal(0, 6, (size, size, 1))
    arr = np.clip(base[None, None, :] * light[..., None] + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def draw_lesion_image(label: str, rng: np.random.Generator, size: int = 160) -> Image.Image:
    """One synthetic image of class ``label`` (one of the canonical six)."""
    img = _skin(rng, size)
    counts, radii, colour, centre, ring = _PATTERNS[label]
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(counts[0], counts[1] + 1)) if counts[1] else 0):
        r = rng.uniform(*radii) * size
        cx, cy = rng.uniform(r, size - r, 2)
        ry = r * (rng.uniform(0.5, 0.75) if label == "HFMD" else rng.uniform(0.85, 1.15))
        jitter = rng.integers(-20, 21, 3)
        fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(colour, jitter))
        outline = (200, 40, 40) if ring else None
        draw.ellipse([cx - r, cy - ry, cx + r, cy + ry], fill=fill, outline=outline, width=ring or 1)
        if centre is not None:
            cr = r * 0.35
            draw.ellipse([cx - cr, cy - cr, cx + cr, cy + cr], fill=centre)
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))


def make_synthetic_dataset(root: str | os.PathLike, images_per_class: int = 30, image_size: int = 160,
                           seed: int = 0, classes: tuple[str, ...] = CANONICAL_CLASSES) -> Path:
    """Write ``root/<class>/SYN<code>_<patient>_<image>.png`` and return ``root``. Deterministic for a seed."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for label in classes:
        out = root / label
        out.mkdir(parents=True, exist_ok=True)
        code = "SYN" + label.upper()[:4]
        patient, image = 1, 1
        for _ in range(images_per_class):
            draw_lesion_image(label, rng, image_size).save(out / f"{code}_{patient:02d}_{image:02d}.png")
            image += 1
            if image > int(rng.integers(2, 4)):
                patient, image = patient + 1, 1
    return root
