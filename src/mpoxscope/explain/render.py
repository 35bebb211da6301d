"""Pictures of saliency maps: an RGB overlay, an overlay figure with a colour bar, and a side-by-side panel.

Figures are drawn on matplotlib ``Figure`` objects with the Agg canvas directly, never through pyplot, so the
global backend of a notebook or server is left alone.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from PIL import Image

from mpoxscope.fileio import atomic_path

CMAP = "jet"
#: Longest side of the images drawn in figures (the .npy maps keep full precision).
DISPLAY_SIDE = 448


def resize_map(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Map (h, w) -> (size[1], size[0]) (PIL order: size = (width, height)), bilinear, clipped to [0, 1]."""
    cam = np.asarray(cam, dtype=np.float32)
    if cam.ndim != 2:
        raise ValueError(f"cam: expected a 2-D map (h, w), got shape {cam.shape}")
    if cam.shape != (size[1], size[0]):
        cam = np.asarray(Image.fromarray(cam).resize(size, Image.Resampling.BILINEAR))
    return np.clip(np.nan_to_num(cam, nan=0.0), 0.0, 1.0)


def heatmap(cam: np.ndarray, cmap: str = CMAP) -> np.ndarray:
    """Map (h, w) in [0, 1] -> colour image (h, w, 3) uint8."""
    return (colormaps[cmap](np.clip(cam, 0, 1))[..., :3] * 255).astype(np.uint8)


def overlay(image: Image.Image, cam: np.ndarray, alpha: float = 0.5, cmap: str = CMAP) -> Image.Image:
    """RGB heat-map overlay at ``image``'s size: ``cam`` (h, w) in [0, 1] is resized as needed and blended
    with weight ``alpha`` over the image."""
    rgb = image.convert("RGB")
    colour = heatmap(resize_map(cam, rgb.size), cmap)
    blend = (1 - alpha) * np.asarray(rgb, dtype=np.float32) + alpha * colour.astype(np.float32)
    return Image.fromarray(np.clip(blend + 0.5, 0, 255).astype(np.uint8), "RGB")


def display_copy(image: Image.Image, side: int = DISPLAY_SIDE) -> Image.Image:
    """An RGB copy at most ``side`` pixels on its longest side (figures of 4000 px photos stay small)."""
    img = image.convert("RGB")
    scale = side / max(img.size)
    if scale < 1:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                         Image.Resampling.LANCZOS)
    return img


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    return Path(path)


def _colorbar(fig: Figure, axes, cmap: str) -> None:
    bar = fig.colorbar(ScalarMappable(norm=Normalize(0, 1), cmap=cmap), ax=axes, fraction=0.046, pad=0.02)
    bar.set_label("relative importance (per-image min-max)", fontsize=8)
    bar.ax.tick_params(labelsize=7)


def save_overlay_png(image: Image.Image, cam: np.ndarray, path: str | os.PathLike, title: str = "",
                     cmap: str = CMAP) -> Path:
    """One overlay with a colour bar, written atomically to ``path``."""
    img = display_copy(image)
    fig = Figure(figsize=(4.8 * img.width / max(img.size) + 0.8, 4.8 * img.height / max(img.size)))
    ax = fig.add_subplot()
    ax.imshow(overlay(img, cam, cmap=cmap))
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    _colorbar(fig, ax, cmap)
    return _save(fig, path)


#: Panels wrap after this many pictures, so a panel with many maps stays readable in the gallery.
PANEL_COLUMNS = 4


def save_panel_png(image: Image.Image, maps: dict[str, np.ndarray], path: str | os.PathLike, title: str,
                   cmap: str = CMAP, columns: int = PANEL_COLUMNS) -> Path:
    """original | one overlay per entry of ``maps`` (in order), at most ``columns`` per row, shared colour bar
    and ``title``."""
    img = display_copy(image)
    n = 1 + len(maps)
    cols = max(1, min(columns, n))
    rows = -(-n // cols)
    aspect = img.width / img.height
    fig = Figure(figsize=(cols * 2.6 * aspect + 0.8, rows * 2.7 + 0.4))
    grid = fig.subplots(rows, cols, squeeze=False)
    axes = [ax for row in grid for ax in row]
    axes[0].imshow(img)
    axes[0].set_title("original", fontsize=9)
    for ax, (name, cam) in zip(axes[1:n], maps.items(), strict=True):
        ax.imshow(overlay(img, cam, cmap=cmap))
        ax.set_title(name, fontsize=9)
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle(title, fontsize=10)
    if maps:
        _colorbar(fig, axes[:n], cmap)
    return _save(fig, path)
