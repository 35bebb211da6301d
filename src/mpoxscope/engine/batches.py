"""Mini-batches for training and validation, from cached trunk outputs or from decoded images.

Both classes give ``start`` (the backbone stage their inputs enter at), ``targets``, ``set_epoch(e)``,
``train_epoch()`` and ``validation()``; the training loop does not care which one it has. Every random draw
(order, view, augmentation) comes from a generator seeded by (seed, epoch), so an epoch is the same whether or
not the run was interrupted before it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from mpoxscope.config import TrainConfig
from mpoxscope.data.batch_augment import BatchAugment, normalise
from mpoxscope.data.samples import SampleSet
from mpoxscope.data.splits import Fold
from mpoxscope.engine.features import FeatureBank
from mpoxscope.engine.imagecache import ImageCache

Batch = tuple[torch.Tensor, torch.Tensor]


def forward_from(model, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Logits for inputs entering the backbone at stage ``start``; stages before ``stop`` are frozen, so they
    run without building a graph (no memory or time spent on their backward pass)."""
    if start < stop:
        with torch.no_grad():
            x = model.forward_features(x, start, stop)
        start = stop
    return model.head(model.forward_features(x, start=start))


class _Epochs:
    """Shuffling shared by both sources: a seeded permutation per epoch, batches of ``batch_size``."""

    def __init__(self, train: list[int], validation: list[int], data: SampleSet, cfg: TrainConfig,
                 rank: int = 0, world_size: int = 1) -> None:
        self.cfg, self.rank, self.world = cfg, rank, world_size
        self.targets = torch.tensor([data.targets[i] for i in train])
        self.val_targets = torch.tensor([data.targets[i] for i in validation])
        self.generator = torch.Generator()
        self.set_epoch(1)

    def _mine(self, n: int) -> slice:
        """This rank's rows of a batch of ``n`` (every rank draws the whole batch, so all stay in step)."""
        return slice(self.rank, n, self.world)

    def validation_targets(self) -> torch.Tensor:
        return self.val_targets[self.rank::self.world]

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(self.cfg.seed * 7919 + epoch)

    def __len__(self) -> int:
        return math.ceil(len(self.targets) / self.cfg.batch_size)

    def _order(self) -> Iterator[torch.Tensor]:
        n = len(self.targets)
        order = torch.randperm(n, generator=self.generator)
        for s in range(0, n, self.cfg.batch_size):
            idx = order[s:s + self.cfg.batch_size]
            if len(idx) < 2 * self.world and n > 1:  # a batch of one per rank breaks BatchNorm in training
                continue
            yield idx


class FeatureBatches(_Epochs):
    """Cached outputs of the frozen trunk: a random one of the bank's augmented views per sample and epoch."""

    def __init__(self, bank: FeatureBank, stop: int, data: SampleSet, fold: Fold, cfg: TrainConfig,
                 rank: int = 0, world_size: int = 1) -> None:
        super().__init__(list(fold.train), list(fold.validation), data, cfg, rank, world_size)
        self.start = stop
        self.views, _ = bank.select(fold.train)
        _, self.val_clean = bank.select(fold.validation)

    def train_epoch(self) -> Iterator[Batch]:
        view = torch.randint(self.views.shape[0], (len(self.targets),), generator=self.generator)
        for idx in self._order():
            idx = idx[self._mine(len(idx))]
            yield self.views[view[idx], idx].float(), self.targets[idx]

    def validation(self) -> Iterator[Batch]:
        clean, targets = self.val_clean[self.rank::self.world], self.validation_targets()
        for s in range(0, len(targets), 256):
            yield clean[s:s + 256].float(), targets[s:s + 256]


class ImageBatches(_Epochs):
    """Images decoded once (uint8, in memory), augmented as tensors on the training device every epoch."""

    def __init__(self, images: ImageCache, model, data: SampleSet, fold: Fold, cfg: TrainConfig,
                 device: torch.device, rank: int = 0, world_size: int = 1) -> None:
        super().__init__(list(fold.train), list(fold.validation), data, cfg, rank, world_size)
        self.start, self.device = 0, device
        self.train_rows = images.index(fold.train)
        self.images = images
        self.val_images = images.clean.index_select(0, images.index(fold.validation))
        self.mean, self.std = model.mean, model.std
        self.augment = BatchAugment(model.config.image_size, cfg.augment, model.mean, model.std)

    def train_epoch(self) -> Iterator[Batch]:
        for idx in self._order():
            raw = self.images.train.index_select(0, self.train_rows[idx]).to(self.device, non_blocking=True)
            mine = self._mine(len(idx))
            if self.world > 1:  # draw the whole batch's augmentation on every rank: the generator stays in step
                yield self.augment(raw, self.generator)[mine], self.targets[idx][mine]
            else:
                yield self.augment(raw, self.generator), self.targets[idx]

    def validation(self) -> Iterator[Batch]:
        images, targets = self.val_images[self.rank::self.world], self.validation_targets()
        for s in range(0, len(targets), 64):
            yield normalise(images[s:s + 64], self.mean, self.std), targets[s:s + 64]
