"""Data-parallel training under ``torchrun`` (DistributedDataParallel): gloo on CPU, NCCL on CUDA.

``torchrun --nproc-per-node N -m mpoxscope.cli train ...`` (or ``cv``) starts N processes; each one reads the
rendezvous from the environment torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``...).
Every rank draws the same batch order and augmentation (same seeded generator) and trains on its slice of each
batch; gradients are averaged by DDP, validation outputs are gathered from all ranks, and only rank 0 writes the
run directory. Without torchrun, everything here is a no-op for a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def context() -> Context:
    """The process group torchrun asked for, initialised on first use (gloo on CPU, NCCL with CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Context()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    return Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def gather_rows(x: torch.Tensor, ctx: Context) -> torch.Tensor:
    """Rows computed by each rank on ``indices[rank::world]`` -> all rows in the original order, on every rank."""
    if not ctx.active:
        return x
    parts: list = [None] * ctx.world_size
    dist.all_gather_object(parts, x.cpu())
    n = sum(len(p) for p in parts)
    out = torch.empty((n, *parts[0].shape[1:]), dtype=parts[0].dtype)
    for r, p in enumerate(parts):
        out[r::ctx.world_size] = p
    return out


def sum_over_ranks(*values: float) -> tuple[float, ...]:
    """Each value summed over all ranks (for epoch statistics every rank computed on its own slice)."""
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return tuple(t.tolist())
