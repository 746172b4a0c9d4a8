"""Scale-out through torch.distributed only (torchrun sets the environment; no home-made cluster code).

Data parallel is DDP: every rank takes its slice of each step's batch, gradients are all-reduced on
the last micro-step only. NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import dataclasses
import os
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


@dataclasses.dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup() -> DistInfo:
    """Join the process group torchrun described (WORLD_SIZE > 1), or run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world=world, device=device)


def wrap(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    if info.world == 1:
        return model
    return DistributedDataParallel(model, device_ids=[info.device.index] if info.device.type == "cuda" else None, find_unused_parameters=False)


def maybe_no_sync(model: torch.nn.Module, sync: bool):
    """Skip the gradient all-reduce on every micro-step but the last."""
    if isinstance(model, DistributedDataParallel) and not sync:
        return model.no_sync()
    return nullcontext()


def mean(value: torch.Tensor, info: DistInfo) -> float:
    if info.world > 1:
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.AVG if dist.get_backend() == "nccl" else dist.ReduceOp.SUM)
        if dist.get_backend() != "nccl":
            value /= info.world
    return float(value)
