"""Each rank's slice of a model for tensor-parallel inference (Megatron's layout), as plain tensors.

:func:`shard_model` cuts a model into the part one rank holds: q/k/v and gate/up by output columns
(whole heads, whole FFN neurons), o_proj and down_proj by input columns (their partial outputs are
summed over the ranks), the embedding table and the output head by vocabulary rows. K/V heads are
split with their query heads, so a rank's paged KV pool holds only its heads (the shard's config
says how many). Int4 GPTQ layers are cut along their packing: output columns for a column split,
whole input groups for a row split. Norms and the hybrid gate network stay whole on every rank.

This module only slices: it never talks to another process (the collectives are added by
:func:`r1kit.infer.tensor_parallel.layers.parallelize`) and never changes the model it is given.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools

import torch
from torch import nn

from r1kit.errors import ConfigError
from r1kit.quant import packing
from r1kit.quant.int4_linear import QuantLinear

COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")


def split_range(total: int, rank: int, size: int, what: str) -> tuple[int, int]:
    """``rank``'s equal share ``[start, stop)`` of ``total`` items; ConfigError where ``size`` does not divide it."""
    if total % size:
        raise ConfigError(f"tensor_parallel_size={size} must divide {what}={total}; choose a size that divides it")
    part = total // size
    return rank * part, (rank + 1) * part


def vocab_part(vocab_size: int, size: int) -> int:
    """Vocabulary rows a rank holds (the last rank may hold fewer): ``⌈V / size⌉`` rounded up to a
    multiple of 8, where a 4- or 8-bit output head's packed columns can be cut."""
    part = -(-vocab_size // size)
    return -(-part // 8) * 8


def vocab_range(vocab_size: int, rank: int, size: int) -> tuple[int, int]:
    """``rank``'s rows ``[start, stop)`` of the vocabulary (:func:`vocab_part` each, the last rank's fewer)."""
    part = vocab_part(vocab_size, size)
    start = min(rank * part, vocab_size)
    return start, min(start + part, vocab_size)


def check_shardable(config, size: int) -> None:
    """ConfigError unless ``size`` ranks can each hold whole query heads, whole K/V heads and whole FFN neurons."""
    if size < 1:
        raise ConfigError(f"tensor_parallel_size={size} must be >= 1")
    for name in ("num_heads", "num_kv_heads", "intermediate_size"):
        split_range(getattr(config, name), 0, size, name)
    if config.hybrid_gate == "head" and config.hybrid_gate_threshold is not None and "hybrid" in config.attention:
        # each rank sees only its heads' gates, and the hard gate's rule asks whether every head's is above the threshold
        raise ConfigError("hybrid_gate_threshold with a per-head hybrid gate cannot run under tensor parallelism: the hard gate's "
                          "decision spans every head, and each rank holds only its own; use tensor_parallel_size=1 or no threshold")


def shard_model(model: nn.Module, rank: int, size: int) -> nn.Module:
    """``rank``'s shard of ``model`` (an unpacked ``R1kitForCausalLM``, float or int4), a new model whose
    unsplit tensors (norms, gates) are ``model``'s own and whose split ones are new; ``model`` is unchanged.
    The shard's ``config`` has the rank's ``num_heads`` and ``num_kv_heads``; its layers compute partial
    results until :func:`~r1kit.infer.tensor_parallel.layers.parallelize` adds the collectives."""
    config = model.config
    check_shardable(config, size)
    # a structural copy that shares every tensor: only the slices below are new memory
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    shard = copy.deepcopy(model, memo)
    heads = split_range(config.num_heads, rank, size, "num_heads")
    kv_heads = split_range(config.num_kv_heads, rank, size, "num_kv_heads")
    neurons = split_range(config.intermediate_size, rank, size, "intermediate_size")
    d = config.head_dim
    for i, layer in enumerate(shard.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        for name, (lo, hi) in (("q_proj", heads), ("k_proj", kv_heads), ("v_proj", kv_heads)):
            setattr(attn, name, split_columns(getattr(attn, name), lo * d, hi * d, f"model.layers.{i}.self_attn.{name}"))
        attn.o_proj = split_rows(attn.o_proj, heads[0] * d, heads[1] * d, rank, f"model.layers.{i}.self_attn.o_proj")
        attn.num_heads, attn.num_kv_heads = heads[1] - heads[0], kv_heads[1] - kv_heads[0]
        attn.qkv_sizes = [attn.num_heads * d] + [attn.num_kv_heads * d] * 2
        for name in ("gate_proj", "up_proj") if mlp.gated else ("up_proj",):
            setattr(mlp, name, split_columns(getattr(mlp, name), *neurons, f"model.layers.{i}.mlp.{name}"))
        mlp.down_proj = split_rows(mlp.down_proj, *neurons, rank, f"model.layers.{i}.mlp.down_proj")
    lo, hi = vocab_range(config.vocab_size, rank, size)
    tied = shard.lm_head.weight is shard.model.embed_tokens.weight
    table = shard.model.embed_tokens.weight
    shard.model.embed_tokens = nn.Embedding(hi - lo, config.hidden_size, _weight=table.detach()[lo:hi].clone(),
                                            device=table.device, dtype=table.dtype)
    shard.model.embed_tokens.weight.requires_grad_(table.requires_grad)
    if tied:
        shard.lm_head = _linear(shard.model.embed_tokens.weight, None)
    else:
        shard.lm_head = split_columns(shard.lm_head, lo, hi, "lm_head")
    shard.config = dataclasses.replace(config, num_heads=config.num_heads // size, num_kv_heads=config.num_kv_heads // size)
    return shard


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, requires_grad: bool = False) -> nn.Linear:
    """An ``nn.Linear`` holding ``weight`` (an ``nn.Parameter`` is kept as it is: a tied head shares it)."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta", dtype=weight.dtype)
    layer.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=requires_grad)
    if bias is not None:
        layer.bias = nn.Parameter(bias, requires_grad=requires_grad)
    return layer


def split_columns(layer: nn.Module, start: int, stop: int, name: str) -> nn.Module:
    """Outputs ``[start, stop)`` of a linear (float or int4): a column-parallel shard."""
    if isinstance(layer, QuantLinear):
        per = 32 // layer.bits  # zero points packed in one int32 word
        if start % per or stop % per:
            raise ConfigError(f"{name}: a {layer.bits}-bit layer packs {per} zero points per word, so its outputs split only at multiples "
                              f"of {per}, not at [{start}, {stop}); choose another tensor_parallel_size")
        part = _int4_like(layer, layer.in_features, stop - start, layer.group_size, layer.bias is not None)
        tensors = {"qweight": layer.qweight[:, start:stop], "qzeros": layer.qzeros[:, start // per : stop // per],
                   "scales": layer.scales[:, start:stop], "g_idx": layer.g_idx,
                   "bias": None if layer.bias is None else layer.bias[start:stop]}
        return _fill(part, tensors)
    _check_linear(layer, name)
    weight = layer.weight.detach()[start:stop].clone()
    bias = None if layer.bias is None else layer.bias.detach()[start:stop].clone()
    return _linear(weight, bias, layer.weight.requires_grad)


def split_rows(layer: nn.Module, start: int, stop: int, rank: int, name: str) -> nn.Module:
    """Inputs ``[start, stop)`` of a linear (float or int4): a row-parallel shard, whose partial outputs
    the ranks sum; the bias is rank 0's alone, so that it is added once."""
    keep_bias = rank == 0
    if isinstance(layer, QuantLinear):
        return _int4_rows(layer, start, stop, keep_bias, name)
    _check_linear(layer, name)
    weight = layer.weight.detach()[:, start:stop].clone()
    bias = layer.bias.detach().clone() if layer.bias is not None and keep_bias else None
    return _linear(weight, bias, layer.weight.requires_grad)


def _int4_rows(layer: QuantLinear, start: int, stop: int, keep_bias: bool, name: str) -> QuantLinear:
    """Input features ``[start, stop)`` of an int4 layer: whole groups, ``g_idx`` renumbered from the first."""
    if not packing.groups_contiguous(layer.g_idx, layer.in_features, layer.group_size):
        raise ConfigError(f"{name} is an act-order (desc_act) GPTQ layer: its groups are scattered over its inputs, so they cannot be "
                          "split by input rows between ranks; requantize without act-order (desc_act=False) or use tensor_parallel_size=1")
    span = packing.group_span(layer.in_features, layer.group_size)
    whole = layer.group_size == -1  # one group over every input: each rank keeps it
    if not whole and (start % span or stop % span and stop != layer.in_features):
        raise ConfigError(f"{name}: its inputs split at [{start}, {stop}), inside a quantization group of {span}; choose a "
                          f"tensor_parallel_size for which in_features={layer.in_features} / size is a multiple of group_size={span}")
    first, last = (0, 1) if whole else (start // span, -(-stop // span))
    part = _int4_like(layer, stop - start, layer.out_features, -1 if whole else layer.group_size, keep_bias and layer.bias is not None)
    per = 32 // layer.bits  # input weights packed in one int32 word
    tensors = {"qweight": layer.qweight[start // per : stop // per], "qzeros": layer.qzeros[first:last], "scales": layer.scales[first:last],
               "g_idx": packing.default_g_idx(stop - start, part.group_size, layer.g_idx.device),
               "bias": layer.bias if keep_bias else None}
    return _fill(part, tensors)


def _int4_like(layer: QuantLinear, in_features: int, out_features: int, group_size: int, bias: bool) -> QuantLinear:
    dtype = layer.bias.dtype if layer.bias is not None else torch.float32
    part = QuantLinear(in_features, out_features, group_size, bias=bias, bits=layer.bits, zero_offset=layer.zero_offset, dtype=dtype,
                      device="meta")
    part.backend = layer.backend
    return part


def _fill(part: QuantLinear, tensors: dict[str, torch.Tensor | None]) -> QuantLinear:
    for key, tensor in tensors.items():
        if tensor is not None:
            setattr(part, key, tensor.detach().contiguous().clone())
        elif key == "bias":
            part.bias = None
    return part


def _check_linear(layer: nn.Module, name: str) -> None:
    if type(layer) is not nn.Linear:
        raise ConfigError(f"{name} is a {type(layer).__name__}: tensor parallelism shards plain nn.Linear and QuantLinear layers "
                          "(shard a model before the engine packs it)")
