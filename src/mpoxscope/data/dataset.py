"""PyTorch dataset over a list of samples."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils.data import Dataset

from mpoxscope.data.images import load_image
from mpoxscope.data.samples import SampleSet


class ImageDataset(Dataset):
    """Yields ``(image_tensor, target)``; ``target`` is -1 for labels outside the class list."""

    def __init__(self, data: SampleSet, indices: Sequence[int] | None = None,
                 transform: Callable | None = None) -> None:
        self.data = data
        self.indices = list(range(len(data))) if indices is None else list(indices)
        self.transform = transform
        self._class_index = {c: i for i, c in enumerate(data.classes)}

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        sample = self.data.samples[self.indices[i]]
        img = load_image(sample.path)
        x = self.transform(img) if self.transform is not None else img
        return x, self._class_index.get(sample.label, -1)
