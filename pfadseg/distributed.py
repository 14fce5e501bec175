"""Data-parallel training across processes started by torchrun (NCCL on GPUs,
gloo on CPUs). Outside torchrun every function here is a no-op for one process."""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def launched() -> bool:
    """True in a process that torchrun started as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank() -> int:
    """This process's rank (torchrun's RANK before the group is joined; 0 for one process)."""
    if torch_dist.is_initialized():
        return torch_dist.get_rank()
    return int(os.environ.get("RANK", "0")) if launched() else 0


def world_size() -> int:
    """Number of processes training together (1 without torch.distributed)."""
    return torch_dist.get_world_size() if torch_dist.is_initialized() else 1


def processes() -> int:
    """The processes torchrun started, known before the group is joined (for checks
    that should fail in a second, not after the images load)."""
    return int(os.environ.get("WORLD_SIZE", "1")) if launched() else 1


def is_main() -> bool:
    """Whether this process writes files (rank 0, or the only process)."""
    return rank() == 0


def setup(device: torch.device) -> torch.device:
    """Join torchrun's process group and return this rank's device: for CUDA the
    GPU given by LOCAL_RANK. One process: `device` unchanged."""
    if not launched() or torch_dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                  timeout=datetime.timedelta(minutes=10))
    return device


def teardown() -> None:
    """Leave the process group before the process exits (NCCL warns otherwise)."""
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def wrap(module: nn.Module, device: torch.device) -> nn.Module:
    """`module` in DistributedDataParallel when several processes train (gradients
    averaged over the ranks at every backward; rank 0's weights broadcast at the start)."""
    if world_size() == 1:
        return module
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def split_batch(batch_size: int, n: int | None = None) -> int:
    """This rank's share of a global batch over `n` processes (default: those
    training together), which must divide evenly."""
    n = n or world_size()
    if batch_size % n:
        raise ValueError(f"batch size {batch_size} does not split over {n} processes: "
                         f"use a multiple of {n} (--batch-size)")
    return batch_size // n


def gather(obj: object) -> list[object]:
    """Every rank's `obj`, in rank order (a list of one without torchrun)."""
    if world_size() == 1:
        return [obj]
    out: list[object] = [None] * world_size()
    torch_dist.all_gather_object(out, obj)
    return out


def sync_state(module: nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers: the batch-norm running
    statistics, which each rank takes from its own share of the batch, and weights
    rank 0 alone changed (the student it picked at the end of stage 1)."""
    if world_size() > 1:
        for tensor in module.state_dict().values():
            torch_dist.broadcast(tensor, src=0)


def barrier() -> None:
    """Wait for every rank (nothing to wait for in one process)."""
    if world_size() > 1:
        torch_dist.barrier()
