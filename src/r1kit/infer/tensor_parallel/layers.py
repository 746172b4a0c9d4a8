"""The collectives of a tensor-parallel shard: module swaps over plain local tensors (gpt-fast's
``tp.py``, vLLM's parallel layers), not DTensor, whose per-operation dispatch costs more than a
decode step's small products.

:func:`parallelize` turns a shard cut by :func:`~r1kit.infer.tensor_parallel.sharding.shard_model`
into one that joins its group: a row-parallel layer's partial output is all-reduced
(:class:`RowParallelLinear`), the embedding looks up the rank's rows of the vocabulary and
all-reduces (:class:`VocabParallelEmbedding`), the output head computes the rank's logits and
gathers them to rank 0 (:class:`VocabParallelHead`: only rank 0 samples). The hybrid gate and the
Top-K FFN take the rules the trainer's tensor parallelism wrote (:mod:`r1kit.train.parallel`):
each rank keeps its heads' gate, and the Top-K threshold is the k-th largest magnitude over every
rank's neurons. The wrapped linears stay children named ``linear``, so the engine's packing
(:func:`~r1kit.infer.weight_packing.pack_linears`) still re-lays them for oneDNN.

Every collective adds its wall time to a :class:`CollectiveClock` (``benchmarks/bench_tp.py`` reads it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from r1kit.infer.tensor_parallel.sharding import vocab_part, vocab_range
from r1kit.model.ffn import TopKFFN
from r1kit.model.transformer import specialize
from r1kit.train.parallel import TensorParallelAttention, TensorParallelShard, TensorParallelTopKFFN


@dataclass
class CollectiveClock:
    """Wall time spent in this rank's collectives, and how many there were (a CPU figure: on a GPU
    the launches are asynchronous and this counts launch time only)."""

    seconds: float = 0.0
    calls: int = 0

    def add(self, started: float) -> None:
        self.seconds += time.perf_counter() - started
        self.calls += 1


class RowParallelLinear(nn.Module):
    """A linear holding a slice of the inputs (``linear``); its partial products are summed over the group.
    ``in_features`` is the whole layer's, as for the unsharded layer (the Top-K FFN's ``k`` reads it)."""

    def __init__(self, linear: nn.Module, in_features: int, shard: TensorParallelShard, clock: CollectiveClock) -> None:
        super().__init__()
        self.linear, self.in_features, self.shard, self.clock = linear, in_features, shard, clock

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        started = time.perf_counter()
        dist.all_reduce(out, group=self.shard.group)
        self.clock.add(started)
        return out


class VocabParallelEmbedding(nn.Module):
    """The embedding rows ``[start, start + weight.shape[0])`` of the vocabulary: tokens outside them look
    up zeros, and the all-reduce gives each token its row from the rank that holds it."""

    def __init__(self, weight: torch.Tensor, start: int, shard: TensorParallelShard, clock: CollectiveClock) -> None:
        super().__init__()
        self.weight, self.start, self.shard, self.clock = weight, start, shard, clock

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill_(outside[..., None], 0)
        started = time.perf_counter()
        dist.all_reduce(out, group=self.shard.group)
        self.clock.add(started)
        return out


class VocabParallelHead(nn.Module):
    """The output head's rows for the rank's vocabulary (``linear``): rank 0 gets every rank's logits,
    side by side [..., vocab_size]; the other ranks get their own (nothing reads them)."""

    def __init__(self, linear: nn.Module, vocab_size: int, shard: TensorParallelShard, clock: CollectiveClock) -> None:
        super().__init__()
        self.linear, self.vocab_size, self.shard, self.clock = linear, vocab_size, shard, clock
        self.part = vocab_part(vocab_size, shard.size)  # every rank sends this many columns: the last one pads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = self.linear(x)
        if local.shape[-1] < self.part:
            local = F.pad(local, (0, self.part - local.shape[-1]))
        local = local.contiguous()
        parts = [torch.empty_like(local) for _ in range(self.shard.size)] if self.shard.rank == 0 else None
        started = time.perf_counter()
        dist.gather(local, parts, group=self.shard.group, group_dst=0)
        self.clock.add(started)
        return local if parts is None else torch.cat(parts, dim=-1)[..., : self.vocab_size]


class TimedTopKFFN(TensorParallelTopKFFN):
    """:class:`~r1kit.train.parallel.TensorParallelTopKFFN`, its threshold's collectives on the clock
    (with the small local top-k they follow)."""

    clock: CollectiveClock

    def keep(self, magnitude: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        started = time.perf_counter()
        kept = super().keep(magnitude)
        self.clock.add(started)
        return kept


def parallelize(shard: nn.Module, group: dist.ProcessGroup, rank: int, size: int, clock: CollectiveClock) -> nn.Module:
    """Add the collectives to ``shard`` (rank ``rank`` of ``size``, cut by ``shard_model``), in place."""
    place = TensorParallelShard(group=group, rank=rank, size=size)
    config = shard.config
    for layer in shard.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.o_proj = RowParallelLinear(attn.o_proj, config.num_heads * size * config.head_dim, place, clock)
        mlp.down_proj = RowParallelLinear(mlp.down_proj, config.intermediate_size, place, clock)
        if attn.kind == "hybrid":  # the others keep their class, so the engine still fuses their q/k/v
            layer.self_attn = specialize(attn, TensorParallelAttention, shard=place)
        if isinstance(mlp, TopKFFN):
            # the gather path ranks neurons within one device's rows: a shard never takes it
            layer.mlp = specialize(mlp, TimedTopKFFN, shard=place, clock=clock, gather_max_tokens=0)
    start, _ = vocab_range(config.vocab_size, rank, size)
    shard.model.embed_tokens = VocabParallelEmbedding(shard.model.embed_tokens.weight, start, place, clock)
    shard.lm_head = VocabParallelHead(shard.lm_head, config.vocab_size, place, clock)
    return shard
