"""Scale-out through torch.distributed only (torchrun sets the environment; no home-made cluster code).

The processes form a 2-D grid ``dp × tp`` (``tp`` = ``train.tensor_parallel``): the ranks of one
tensor-parallel group hold slices of every block (DTensor, see :mod:`r1kit.train.parallel`) and read
the same batch; the data-parallel groups take their own slices of each step's batch. Data parallel
(``train.data_parallel``) is DDP (every process keeps the whole model, gradients all-reduced on the
last micro-step) or FSDP2 (``fully_shard``: parameters, gradients and optimizer state sharded over
the data-parallel ranks), which is also what combines with tensor parallelism, as torchtitan does.
NCCL on CUDA, gloo on CPU.
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
    data_parallel: str = "ddp"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_world(self) -> int:
        return self.world // self.tp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp

    @property
    def sharded(self) -> bool:
        """Whether parameters are DTensors (tensor parallel or FSDP): their full values need collectives."""
        return self.tp > 1 or self.data_parallel == "fsdp"


def setup(tensor_parallel: int = 1, device: str = "auto", data_parallel: str = "ddp") -> DistInfo:
    """Join the process group torchrun described (WORLD_SIZE > 1), or run alone. ``device``
    (``train.device``): ``auto`` takes one GPU per process where there are GPUs (NCCL), else the
    CPU (gloo); ``cpu`` forces gloo on the CPU; ``cuda`` insists on GPUs. ``data_parallel``: ``ddp``
    or ``fsdp`` (``train.data_parallel``); the layout is checked against the number of processes here."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    check_layout(world, tensor_parallel, data_parallel)
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
    return DistInfo(rank=rank, world=world, device=place, tp=tensor_parallel, data_parallel=data_parallel)


def check_layout(world: int, tensor_parallel: int, data_parallel: str) -> None:
    """Raise :class:`ConfigError` for a parallel layout these ``world`` processes cannot take."""
    if world % tensor_parallel:
        raise ConfigError(
            f"train.tensor_parallel={tensor_parallel} does not divide the {world} processes: the processes form a grid of "
            "data-parallel × tensor-parallel groups, so launch a multiple of tensor_parallel processes (torchrun --nproc-per-node)"
        )
    dp = world // tensor_parallel
    if data_parallel == "fsdp" and dp == 1:
        raise ConfigError(
            f"train.data_parallel=fsdp with {world} process(es) and tensor_parallel={tensor_parallel} leaves one data-parallel "
            "rank, with nothing to shard over: launch more processes (torchrun --nproc-per-node), or set train.data_parallel=ddp "
            "(--data-parallel ddp), which also resumes an FSDP run's checkpoint on this number of processes"
        )
    if data_parallel == "ddp" and tensor_parallel > 1 and dp > 1:
        raise ConfigError(
            f"{world} processes with train.tensor_parallel={tensor_parallel} make {dp} data-parallel groups of tensor-parallel "
            "ranks, which needs FSDP: set train.data_parallel=fsdp (--data-parallel fsdp), or tensor_parallel to the number "
            "of processes for tensor parallelism alone"
        )


def wrap(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """Apply the run's parallelism: tensor parallel and/or FSDP2 in place, DDP as a wrapper, or nothing.

    torchtitan's order: tensor parallelism first, over the mesh's ``tp`` rows, then ``fully_shard``
    over its ``dp`` columns (FSDP2 shards the DTensors TP made along a second mesh dimension)."""
    if info.sharded:
        from torch.distributed.device_mesh import init_device_mesh

        from r1kit.train.parallel import apply_fsdp, apply_tp

        mesh = init_device_mesh(info.device.type, (info.dp_world, info.tp), mesh_dim_names=("dp", "tp"))
        if info.tp > 1:
            apply_tp(model, mesh["tp"])
        if info.data_parallel == "fsdp":
            apply_fsdp(model, mesh["dp"])
        return model
    if info.world == 1:
        return model
    return DistributedDataParallel(model, device_ids=[info.device.index] if info.device.type == "cuda" else None, find_unused_parameters=False)


def maybe_no_sync(model: torch.nn.Module, sync: bool):
    """Skip DDP's gradient all-reduce on every micro-step but the last.

    FSDP2 reduce-scatters on every micro-step instead (torchtitan's choice): skipping would keep whole
    unsharded gradients between micro-steps, the memory FSDP is there to save."""
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
    """A sharded model's whole state, gathered on rank 0 (on the CPU) and empty on the other ranks.

    A collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def clip_grad_norm(params: list[torch.Tensor], max_norm: float, info: DistInfo) -> torch.Tensor:
    """Clip the global gradient norm (``max_norm`` 0: only measure it); returns the norm before clipping.

    Sharded gradients are DTensors on up to two meshes (the 2-D grid for tensor-parallel weights, the
    ``dp`` columns for FSDP's other weights, none for weights tensor parallelism leaves whole): each
    mesh's norm is reduced over its own ranks by DTensor (a shard counts once, a replica once), and the
    meshes' squares are summed. torch's ``clip_grad_norm_`` refuses such a mix."""
    limit = max_norm if max_norm > 0 else float("inf")
    if not info.sharded:
        return torch.nn.utils.clip_grad_norm_(params, limit)
    from torch.distributed.tensor import DTensor

    by_mesh: dict[object, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            by_mesh.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p)
    squares = []
    for group in by_mesh.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group])
        squares.append((norm.full_tensor() if isinstance(norm, DTensor) else norm).square())
    total = torch.stack(squares).sum().sqrt()
    for group in by_mesh.values():
        torch.nn.utils.clip_grads_with_norm_(group, limit, total)
    return total
