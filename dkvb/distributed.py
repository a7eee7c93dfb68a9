"""torch.distributed helpers for multi-process embedding (``torchrun --nproc_per_node=N -m dkvb embed``)."""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist

__all__ = ["rank_and_world", "barrier", "process_group"]


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if rank_and_world()[1] > 1:
        dist.barrier()


@contextmanager
def process_group(device: str = "cpu") -> Iterator[str]:
    """Join the process group torchrun describes in the environment (``WORLD_SIZE`` > 1).

    Yields the device this rank should use: ``cuda:<LOCAL_RANK>`` for CUDA, else ``device``.
    Uses NCCL for CUDA and gloo otherwise; outside torchrun it does nothing.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or dist.is_initialized():
        yield device
        return
    cuda = device.startswith("cuda")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield f"cuda:{local}" if cuda else device
    finally:
        dist.destroy_process_group()
