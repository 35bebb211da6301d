"""The CPU fast path: outputs of a frozen backbone trunk, computed once for several augmented views and cached.

With the first ``stop`` backbone stages frozen (and in eval mode), their output for a given input never changes,
so training the rest (the last stages and the head) on cached outputs is exact, not an approximation; the
augmentation is frozen into ``n_views`` draws per image instead of a new draw each epoch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from PIL import Image

from mpoxscope.data.images import load_image
from mpoxscope.data.samples import SampleSet
from mpoxscope.data.transforms import AugmentConfig, eval_transform, train_transform
from mpoxscope.models.factory import SkinLesionNet
from mpoxscope.progress import progress as make_progress


@dataclass(frozen=True)
class BankKey:
    """What a bank's contents depend on; a bank is reused only when every field matches."""

    backbone: str
    pretrained_source: str
    image_size: int
    stop: int
    n_views: int
    seed: int
    augment: AugmentConfig


@dataclass
class FeatureBank:
    """Cached trunk outputs: ``views`` (V, N, C, H, W) of augmented training views and ``clean`` (N, C, H, W) of
    the evaluation transform, float16, row ``rows[i]`` for sample index ``i``."""

    key: BankKey
    rows: dict[int, int]
    views: torch.Tensor
    clean: torch.Tensor

    def covers(self, indices) -> bool:
        return all(i in self.rows for i in indices)

    def select(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """(V, n, C, H, W) views and (n, C, H, W) clean outputs for ``indices``, in that order."""
        r = torch.tensor([self.rows[i] for i in indices], dtype=torch.long)
        return self.views.index_select(1, r), self.clean.index_select(0, r)


def _fit_for_crops(img: Image.Image, image_size: int) -> Image.Image:
    """Shrink large photos once so every augmented view does not resample megapixels again."""
    target = int(image_size * 1.5)
    if min(img.size) <= target:
        return img
    scale = target / min(img.size)
    return img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)


class _Views(torch.utils.data.Dataset):
    """Sample ``indices[k]`` as (clean (3, S, S), views (n_views, 3, S, S)): the evaluation transform and
    ``n_views`` draws of the training augmentation, each seeded by (seed, view, sample index) — the same
    pixels in any DataLoader worker process or in none."""

    def __init__(self, data: SampleSet, indices: list[int], size: int, clean_tf, aug_tf, n_views: int,
                 seed: int) -> None:
        self.data, self.indices, self.size = data, indices, size
        self.clean_tf, self.aug_tf, self.n_views, self.seed = clean_tf, aug_tf, n_views, seed

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = self.indices[k]
        img = load_image(self.data.samples[i].path)
        small = _fit_for_crops(img, self.size)
        views = []
        for v in range(self.n_views):
            torch.manual_seed(self.seed * 1_000_003 + v * 100_003 + i)
            views.append(self.aug_tf(small))
        return self.clean_tf(img), torch.stack(views) if views else torch.empty(0, 3, self.size, self.size)


def bank_workers(device: torch.device, num_workers: int) -> int:
    """Processes augmenting a bank's views: ``num_workers`` next to an accelerator, whose forward pass waits on
    this host work (an H200 sat at 10 % while one thread augmented a Lite2 bank for 42 s); none on a CPU, where
    the trunk's forward pass is the cost and extra processes would take its cores."""
    return max(0, num_workers) if device.type != "cpu" else 0


@torch.no_grad()
def build_feature_bank(model: SkinLesionNet, stop: int, data: SampleSet, indices, n_views: int, seed: int,
                       augment: AugmentConfig, device: torch.device, batch_size: int = 16,
                       progress: bool = True, desc: str = "caching features", workers: int = 0) -> FeatureBank:
    """Run stages ``[:stop]`` of ``model`` on every sample in ``indices``: once with the evaluation transform,
    and ``n_views`` times with seeded training augmentation (view ``v`` of sample ``i`` is the same draw in
    every fold, so one bank serves all folds of a cross-validation). ``workers`` DataLoader processes decode and
    augment; the bank is the same for any number of them."""
    indices = list(indices)
    size = model.config.image_size
    dataset = _Views(data, indices, size, eval_transform(size, model.mean, model.std),
                     train_transform(size, augment, model.mean, model.std), n_views, seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    trunk_was_training = model.training
    model.eval()
    # A bar on a terminal, plain lines with an ETA in a log file: a frozen-trunk cache can take many minutes.
    bar = make_progress(total=len(indices) * (n_views + 1), desc=desc, unit="img", disable=not progress)
    # The per-image seeds reset the global RNG when no worker process is used; restoring it afterwards makes
    # training draw the same random numbers whether the bank was built here, read from its cache file (a resumed
    # run) or shared by cv.
    views: list[torch.Tensor] = []
    clean: list[torch.Tensor] = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for clean_b, views_b in loader:  # (B, 3, S, S), (B, V, 3, S, S)
            clean.append(_run(model, stop, clean_b, device))
            per_view = [_run(model, stop, views_b[:, v].contiguous(), device) for v in range(n_views)]
            views.append(torch.stack(per_view) if per_view else torch.empty(0))
            bar.update(len(clean_b) * (n_views + 1))
    bar.close()
    model.train(trunk_was_training)
    key = bank_key(model, stop, n_views, seed, augment)
    clean_t = torch.cat(clean)
    views_t = torch.cat(views, dim=1) if n_views else clean_t.new_empty((0, *clean_t.shape))
    return FeatureBank(key, {i: r for r, i in enumerate(indices)}, views_t, clean_t)


def _run(model: SkinLesionNet, stop: int, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return model.forward_features(x.to(device), 0, stop).to("cpu", torch.float16)


def _bank_digest(key: BankKey, data: SampleSet, indices) -> str:
    """What a bank depends on: its key and the exact files (path, size, modification time) it was computed from."""
    import hashlib
    import json
    import os

    files = []
    for i in indices:
        st = os.stat(data.samples[i].path)
        files.append([str(data.samples[i].path), st.st_size, st.st_mtime_ns])
    from mpoxscope.data import images  # the decoder's size cap changes the pixels of very large photos

    blob = json.dumps({"key": dataclasses.asdict(key), "files": files, "max_side": images.DEFAULT_MAX_SIDE},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def save_bank(path, bank: FeatureBank, data: SampleSet) -> None:
    """Persist ``bank`` (safetensors, atomically) so an interrupted run does not compute it again."""
    from safetensors.torch import save_file

    from mpoxscope.fileio import atomic_path

    indices = sorted(bank.rows, key=bank.rows.get)
    tensors = {"views": bank.views.contiguous(), "clean": bank.clean.contiguous(),
               "indices": torch.tensor(indices, dtype=torch.long)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"digest": _bank_digest(bank.key, data, indices)})


def load_bank(path, key: BankKey, data: SampleSet, indices) -> FeatureBank | None:
    """The bank saved at ``path`` when it was computed with ``key`` from the same files and covers
    ``indices``; None otherwise (it is then rebuilt: a cache never decides a result)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            digest = (f.metadata() or {}).get("digest")
            stored = f.get_tensor("indices").tolist()
            if digest != _bank_digest(key, data, stored) or not set(indices) <= set(stored):
                return None
            return FeatureBank(key, {i: r for r, i in enumerate(stored)}, f.get_tensor("views"),
                               f.get_tensor("clean"))
    except Exception:  # missing, truncated or foreign file: recompute
        return None


def bank_key(model: SkinLesionNet, stop: int, n_views: int, seed: int, augment: AugmentConfig) -> BankKey:
    return BankKey(model.config.backbone, getattr(model, "pretrained_source", "?"), model.config.image_size, stop,
                   n_views, seed, dataclasses.replace(augment))


def cached_feature_bank(cache_file, model: SkinLesionNet, stop: int, data: SampleSet, indices, n_views: int,
                        seed: int, augment: AugmentConfig, device: torch.device, progress: bool = True,
                        desc: str = "caching features", num_workers: int = 0) -> FeatureBank:
    """:func:`build_feature_bank`, reusing (and writing) ``cache_file`` when given; ``num_workers`` (the
    run's ``--workers``) become augmenting processes next to an accelerator only (:func:`bank_workers`)."""
    key = bank_key(model, stop, n_views, seed, augment)
    if cache_file is not None:
        bank = load_bank(cache_file, key, data, indices)
        if bank is not None:
            return bank
    bank = build_feature_bank(model, stop, data, indices, n_views, seed, augment, device, progress=progress,
                              desc=desc, workers=bank_workers(device, num_workers))
    if cache_file is not None:
        save_bank(cache_file, bank, data)
    return bank
