"""Tensor parallelism as a plan over a DeviceMesh (DTensor ``parallelize_module``), as torchtitan does.

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
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from r1kit.errors import ConfigError


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
    """What a layer needs to know about its place in the tensor-parallel group."""

    group: dist.ProcessGroup
    rank: int
    size: int

    def local_gate(self, g: torch.Tensor, local_heads: int) -> torch.Tensor:
        """This rank's share of the gate [B, 1 or H, m, 1], with its gradient summed over ranks."""
        g = _AllReduceBackward.apply(g, self.group)
        if g.shape[1] == 1:
            return g
        return g[:, self.rank * local_heads : (self.rank + 1) * local_heads]

    def topk_mask(self, magnitude: torch.Tensor, k: int) -> torch.Tensor:
        """Boolean mask of this rank's neurons that are among the global top-``k`` by magnitude."""
        local = magnitude.topk(min(k, magnitude.shape[-1]), dim=-1).values.contiguous()
        gathered = [torch.empty_like(local) for _ in range(self.size)]
        dist.all_gather(gathered, local, group=self.group)
        threshold = torch.cat(gathered, dim=-1).topk(k, dim=-1).values[..., -1:]
        return magnitude >= threshold

    def sum_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        value = value.detach().clone()
        dist.all_reduce(value, group=self.group)
        return value


def apply_tp(model, mesh: DeviceMesh) -> None:
    """Shard every block of ``model`` over the 1-D tensor-parallel ``mesh`` in place."""
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
        layer.self_attn.tp = shard
        if hasattr(layer.mlp, "sparsity"):
            layer.mlp.tp = shard
