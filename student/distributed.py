"""Process-group plumbing for student training: torchrun environment, backend choice, small collectives.

``torchrun`` (``python -m torch.distributed.run``) sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT`` in every process it starts. Without them the process trains alone and no
process group is created. Gloo serves CPU runs; NCCL serves CUDA runs, one GPU per local rank.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job. ``world_size == 1`` and ``rank == 0`` when not under torchrun."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistInfo:
    """Read the torchrun environment, pick the device and create the process group when there are peers.

    ``device`` is ``"auto"`` (CUDA when available, else CPU), ``"cpu"`` or ``"cuda"``.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        # device_id binds NCCL communicators to this rank's GPU up front (no lazy per-call binding).
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend=backend, **kwargs)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=dev)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def all_reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    out = values.detach().clone()
    if info.distributed:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_gather_bytes(data: bytes, info: DistInfo) -> list[bytes]:
    """Every rank's ``data`` (the same length on all ranks), in rank order."""
    if not info.distributed:
        return [data]
    mine = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(info.device)
    parts = [torch.empty_like(mine) for _ in range(info.world_size)]
    dist.all_gather(parts, mine)
    return [bytes(p.cpu().tolist()) for p in parts]
