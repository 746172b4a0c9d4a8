"""Scale-out through torch.distributed only (torchrun sets the environment; no home-made cluster code).

Data parallel is DDP: every rank takes its slice of each step's batch, gradients are all-reduced on
the last micro-step only. Tensor parallel (``train.tensor_parallel``) shards every block over the
ranks with DTensor (see :mod:`r1kit.train.parallel`); all its ranks read the same batch. NCCL on
CUDA, gloo on CPU.
"""

from __future__ import annotations

import dataclasses
import os
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from r1kit.device import resolve_device
from r1kit.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    tp: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_world(self) -> int:
        return self.world // self.tp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp


def setup(tensor_parallel: int = 1, device: str = "auto") -> DistInfo:
    """Join the process group torchrun described (WORLD_SIZE > 1), or run alone. ``device``
    (``train.device``): ``auto`` takes one GPU per process where there are GPUs (NCCL), else the
    CPU (gloo); ``cpu`` forces gloo on the CPU; ``cuda`` insists on GPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if tensor_parallel not in (1, world):
        raise ConfigError(
            f"train.tensor_parallel={tensor_parallel} with {world} processes: use 1 (data parallel) or the world size "
            "(tensor parallel); combining both needs FSDP2, which r1kit does not do yet"
        )
    if world == 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    kind = resolve_device("auto").type if device == "auto" else torch.device(device).type  # train.device is validated at load
    if kind == "cuda":
        if local >= torch.cuda.device_count():
            raise ConfigError(
                f"process {local} of this node needs its own GPU, but {torch.cuda.device_count()} are visible: launch at most "
                f"{torch.cuda.device_count()} processes per node (torchrun --nproc-per-node), or set train.device=cpu (gloo)"
            )
        place = torch.device("cuda", local)
        torch.cuda.set_device(place)
        backend = "nccl"
    else:
        place, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world=world, device=place, tp=tensor_parallel)


def wrap(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """Apply the run's parallelism: tensor parallel in place, DDP as a wrapper, or nothing."""
    if info.tp > 1:
        from torch.distributed.device_mesh import init_device_mesh

        from r1kit.train.parallel import apply_tp

        apply_tp(model, init_device_mesh(info.device.type, (info.tp,)))
        return model
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


def barrier(info: DistInfo) -> None:
    if info.world > 1:
        dist.barrier()


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state with tensor-parallel shards gathered (a collective: every rank must call it)."""
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v) for k, v in model.state_dict().items()}


def clip_grad_norm(params: list[torch.Tensor], max_norm: float, info: DistInfo) -> torch.Tensor:
    """Clip the global gradient norm; with tensor parallelism the sharded gradients' squares are summed
    over ranks (torch's ``clip_grad_norm_`` refuses a mix of DTensor and plain gradients)."""
    limit = max_norm if max_norm > 0 else float("inf")
    if info.tp == 1:
        return torch.nn.utils.clip_grad_norm_(params, limit)
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    sharded = torch.zeros((), device=info.device)
    replicated = torch.zeros((), device=info.device)
    for g in grads:
        if isinstance(g, DTensor) and any(pl.is_shard() for pl in g.placements):
            sharded += g.to_local().float().pow(2).sum()
        else:
            replicated += (g.to_local() if isinstance(g, DTensor) else g).float().pow(2).sum()
    dist.all_reduce(sharded)
    total = (sharded + replicated).sqrt()
    scale = (limit / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        (g.to_local() if isinstance(g, DTensor) else g).mul_(scale)
    return total
