"""Distributed set-up from torchrun's environment; a single process needs none of it.

``torchrun --nproc_per_node N -m tzkcli train ...`` sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; multi-node runs add torchrun's
``--nnodes``, ``--node_rank`` and ``--rdzv_*`` flags and nothing changes here. The process
group uses NCCL when the run's device is CUDA and gloo on CPUs; each rank takes
``cuda:LOCAL_RANK``. Rank 0 alone writes the run directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tzkcli.errors import UsageError


@dataclass(frozen=True)
class World:
    """Where this process stands: ``rank`` of ``size`` processes, on ``device``."""

    rank: int
    size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def writer(self) -> bool:
        """Only rank 0 writes checkpoints, metrics and the run record."""
        return self.rank == 0


def choose_device(requested: str, local_rank: int = 0) -> torch.device:
    """``auto``: ``cuda:LOCAL_RANK`` where CUDA is present, else the CPU; else as named.

    Raises:
        UsageError: an unknown device name, or CUDA asked for where there is none.
    """
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UsageError(
            f"--device {requested}: not a device; expected auto, cpu, cuda or cuda:N"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {requested}: CUDA is not available here; expected cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
    return device


def setup(requested_device: str) -> World:
    """Join the process group that torchrun describes, or return a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = choose_device(requested_device, local_rank)
    if size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, rank=rank, world_size=size)
    return World(rank, size, local_rank, device)


def teardown(world: World) -> None:
    """Leave the process group (a no-op for a world of one)."""
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def any_true(flag: bool, world: World) -> bool:
    """Whether ``flag`` is true on any rank (every rank gets the same answer)."""
    if not world.distributed:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=world.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def any_flags(flags: list[bool], world: World) -> list[bool]:
    """For each flag, whether it is true on any rank (one all-reduce for all of them)."""
    if not world.distributed:
        return list(flags)
    value = torch.tensor([1.0 if flag else 0.0 for flag in flags], device=world.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return [bool(v > 0) for v in value.tolist()]


def mean(value: torch.Tensor, world: World) -> torch.Tensor:
    """The mean of ``value`` over ranks (a no-op for a world of one)."""
    if not world.distributed:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / world.size


def broadcast_object(obj: object, world: World) -> object:
    """Rank 0's ``obj`` on every rank."""
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
