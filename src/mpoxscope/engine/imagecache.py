"""Decode each image once per run into uint8 tensors in memory, for fine-tuning on a CPU (or feeding a GPU).

Two copies per image: ``train`` (B, 3, C, C) at ``C = ceil(image_size * margin)``, the source that
:class:`~mpoxscope.data.batch_augment.BatchAugment` crops and rotates each epoch; and ``clean`` (B, 3, S, S),
byte-identical to what the evaluation transform (and so the Predictor) feeds the model before normalising.
755 images at 224 px take about 250 MB.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torchvision.transforms import v2 as T

from mpoxscope.data.images import load_image
from mpoxscope.data.samples import SampleSet
from mpoxscope.progress import progress


@dataclass
class ImageCache:
    """uint8 images: ``train`` (N, 3, C, C) and ``clean`` (N, 3, S, S); row ``rows[i]`` holds sample ``i``."""

    rows: dict[int, int]
    train: torch.Tensor
    clean: torch.Tensor

    def covers(self, indices) -> bool:
        return all(i in self.rows for i in indices)

    def index(self, indices) -> torch.Tensor:
        return torch.tensor([self.rows[i] for i in indices], dtype=torch.long)


def _decode(path, train_size: int, clean_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    img = load_image(path)
    x = T.functional.pil_to_tensor(img)
    clean = T.functional.resize(x, [clean_size, clean_size], antialias=True)
    train = T.functional.resize(x, [train_size, train_size], antialias=True)
    return train, clean


def build_image_cache(data: SampleSet, indices, image_size: int, margin: float = 1.15, workers: int = 2,
                      progress_bar: bool = True) -> ImageCache:
    """Decode ``indices`` of ``data`` with ``workers`` threads (Pillow releases the GIL while decoding)."""
    indices = sorted(set(indices))
    train_size = math.ceil(image_size * margin)
    bar = progress(total=len(indices), desc="decoding images", unit="img", disable=not progress_bar)
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for pair in pool.map(lambda i: _decode(data.samples[i].path, train_size, image_size), indices):
            out.append(pair)
            bar.update(1)
    bar.close()
    train = torch.stack([t for t, _ in out]) if out else torch.empty(0, 3, train_size, train_size, dtype=torch.uint8)
    clean = torch.stack([c for _, c in out]) if out else torch.empty(0, 3, image_size, image_size, dtype=torch.uint8)
    return ImageCache({i: r for r, i in enumerate(indices)}, train, clean)
