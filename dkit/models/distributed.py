"""Training across processes with torch's own engine: ``torchrun --nproc_per_node N -m dkit train ...``.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; ``dkit train`` then joins a process group (gloo on
the CPU, NCCL on CUDA, one GPU per process: cuda:LOCAL_RANK), wraps the model in
DistributedDataParallel, and gives each process its share of every epoch through a
DistributedSampler. The global batch stays ``--batch-size`` (each process takes 1/N of it), so
the steps per epoch and the learning-rate schedule are those of one process. Rank 0 alone writes
the checkpoints and the artifact; the others wait for it.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import torch.distributed as dist


def world() -> tuple[int, int, int]:
    """(rank, world size, local rank); (0, 1, 0) outside torchrun."""
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if size <= 1:
        return 0, 1, 0
    return int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Whether this process reports and writes (rank 0, or the only process)."""
    return world()[0] == 0


@contextmanager
def process_group(device: torch.device):
    """Join the torchrun process group for the block (nothing outside torchrun)."""
    if world()[1] <= 1 or dist.is_initialized():
        yield
        return
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def summed(*values: float) -> list[float]:
    """Each value summed over the processes (as given outside torchrun)."""
    if not dist.is_initialized():
        return list(values)
    on = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=on)
    dist.all_reduce(t)
    return t.cpu().tolist()


def from_main(obj):
    """Rank 0's ``obj`` on every process."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
