"""Tensor parallelism as a plan over a DeviceMesh (DTensor ``parallelize_module``), and FSDP2 over
another, as torchtitan does (:func:`apply_tp` first, then :func:`apply_fsdp`).

Per block: Q/K/V and the FFN's gate/up projections are column-parallel (each rank owns a slice of the
heads and of the FFN neurons), the attention output and FFN down projections row-parallel (their
partial sums are all-reduced). Embeddings, norms and the LM head stay replicated.

The seed's two additions need a rule each, and get the one that keeps results equal to one device:

* **Hybrid gate**: the gate network is small and replicated; every rank computes the whole gate and
  keeps its heads' share (per-head gates) or the shared value (per-token gate). Since each rank's
  gate output only feeds its own heads, its gradient is a partial sum: it is all-reduced on the way
  back (Megatron's "f" operator), so the gate's weights and the residual stream get the full gradient.
* **Top-K FFN**: each rank holds ``f / tp`` neurons, but the ``k`` kept neurons are chosen among all
  ``f``: ranks all-gather their local top-k magnitudes, take the global k-th largest as a threshold
  and keep their neurons above it (the same set one device would keep, ties aside).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    parallelize_module,
)

from r1kit.errors import ConfigError
from r1kit.model.attention import Attention
from r1kit.model.ffn import TopKFFN
from r1kit.model.transformer import specialize


class _AllReduceBackward(torch.autograd.Function):
    """Identity forward; all-reduce (sum) of the gradient over the tensor-parallel group backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


@dataclasses.dataclass
class TensorParallelShard:
    """A layer's place in the tensor-parallel group."""

    group: dist.ProcessGroup
    rank: int
    size: int

    def sum_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        value = value.detach().clone()
        dist.all_reduce(value, group=self.group)
        return value


class TensorParallelAttention(Attention):
    """An attention layer whose heads are sharded: its hybrid gate keeps this rank's heads."""

    shard: TensorParallelShard

    def mix_weight(self, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """This rank's share of the gate [B, 1 or H/tp, m, 1], with its gradient summed over ranks."""
        g = _AllReduceBackward.apply(super().mix_weight(x, q), self.shard.group)
        if g.shape[1] == 1:
            return g
        local_heads = q.shape[1]
        return g[:, self.shard.rank * local_heads : (self.shard.rank + 1) * local_heads]


class TensorParallelTopKFFN(TopKFFN):
    """A Top-K FFN holding a slice of the neurons: it keeps those among the global top-k."""

    shard: TensorParallelShard

    def keep(self, magnitude: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        local = magnitude.topk(min(self.k, magnitude.shape[-1]), dim=-1).values.contiguous()
        gathered = [torch.empty_like(local) for _ in range(self.shard.size)]
        dist.all_gather(gathered, local, group=self.shard.group)
        threshold = torch.cat(gathered, dim=-1).topk(self.k, dim=-1).values[..., -1:]
        mask = magnitude >= threshold
        return mask, self.shard.sum_over_ranks((magnitude * mask).sum(-1)), self.shard.sum_over_ranks(magnitude.sum(-1))


def apply_tp(model, mesh: DeviceMesh) -> None:
    """Shard every block of ``model`` over the 1-D tensor-parallel ``mesh`` in place (a 2-D run passes
    its ``tp`` sub-mesh)."""
    size = mesh.size()
    cfg = model.config
    for name, value in (("num_heads", cfg.num_heads), ("num_kv_heads", cfg.num_kv_heads), ("intermediate_size", cfg.intermediate_size)):
        if value % size:
            raise ConfigError(f"tensor parallel size {size} must divide {name}={value}")
    plan = {
        "self_attn.q_proj": ColwiseParallel(),
        "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(),
        "self_attn.o_proj": RowwiseParallel(),
        "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(),
    }
    if cfg.activation == "swiglu":
        plan["mlp.gate_proj"] = ColwiseParallel()
    shard = TensorParallelShard(group=mesh.get_group(), rank=mesh.get_local_rank(), size=size)
    for layer in model.model.layers:
        parallelize_module(layer, mesh, plan)
        layer.self_attn = specialize(layer.self_attn, TensorParallelAttention, shard=shard)
        if isinstance(layer.mlp, TopKFFN):
            # the gather path ranks neurons within one device's rows: a shard never takes it
            layer.mlp = specialize(layer.mlp, TensorParallelTopKFFN, shard=shard, gather_max_tokens=0)


def apply_fsdp(model, mesh: DeviceMesh) -> None:
    """Shard ``model``'s parameters, gradients and optimizer state over the 1-D data-parallel ``mesh``
    with FSDP2, in place: each block is its own unit (gathered just before it runs, freed after), the
    root holds the rest (embeddings, final norm, head). Tensor-parallel blocks are sharded again along
    this mesh."""
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
