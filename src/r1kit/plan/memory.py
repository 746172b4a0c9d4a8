"""Memory of one model, counted from its config: weights, the KV cache, training's activations and
optimizer state, per tensor-parallel rank.

Each figure follows what r1kit itself allocates, so that the tests can hold them to the real thing:

* **weights**: the model's parameters and buffers (embeddings, norms, the hybrid gate and the LM
  head stay in float when quantized; q/k/v/o and gate/up/down become GPTQ ``qweight``/``qzeros``/
  ``scales``/``g_idx``, as :class:`~r1kit.quant.int4_linear.QuantLinear` holds them);
* **KV cache**: the engine's own block rule (:func:`~r1kit.infer.paged_cache.bytes_per_block`, the
  window group's :meth:`~r1kit.infer.block_manager.WindowGroup.span`, the sizing of
  ``LLMEngine._pool_blocks``): every sequence holds all its blocks in the main group (global and
  full hybrid layers, and the compressed branch's pooled entries), and, where windowed layers sit
  beside them, the blocks its window can reach in the window group;
* **activations**: what autograd keeps for the backward of one training forward (the layers'
  saved tensors, op by op, as PyTorch's kernels save them), with and without activation checkpointing;
* **optimizer**: AdamW's two float32 moments and its step counter per parameter tensor; the
  trainer keeps float32 parameters (the master weights) and gradients whatever its precision.

Tensor parallelism splits heads, FFN neurons and the vocabulary as Megatron does (q/k/v and
gate/up by columns, o and down by rows, KV heads split or, past their count, replicated).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from r1kit.config import ModelConfig
from r1kit.errors import ConfigError
from r1kit.infer.block_manager import WindowGroup
from r1kit.infer.paged_cache import (
    bytes_per_block,
    compressed_layers,
    entries_per_block,
    splits_window,
    windowed_layers,
)
from r1kit.quant.packing import group_count

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
PRECISION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}  # the trainer's autocast dtype
WEIGHT_FORMATS = ("float32", "bfloat16", "float16", "int8", "int4")
QUANT_BITS = {"int8": 8, "int4": 4}


@dataclasses.dataclass(frozen=True)
class Linear:
    """One quantizable projection as a rank holds it."""

    in_features: int
    out_features: int
    bias: bool


def check_tp(config: ModelConfig, tp: int) -> None:
    """Tensor parallelism of ``tp`` ranks splits whole query heads and FFN neurons evenly, and KV
    heads evenly or (past their count) replicates them; raises ConfigError otherwise."""
    if tp < 1 or config.num_heads % tp or config.intermediate_size % tp:
        raise ConfigError(f"tensor parallel size {tp} must divide num_heads={config.num_heads} and intermediate_size={config.intermediate_size}")
    if config.num_kv_heads % tp and tp % config.num_kv_heads:
        raise ConfigError(f"tensor parallel size {tp} must divide num_kv_heads={config.num_kv_heads} or be a multiple of it")


def valid_tp(config: ModelConfig, limit: int) -> list[int]:
    """The tensor-parallel sizes up to ``limit`` that :func:`check_tp` accepts."""
    out = []
    for tp in range(1, limit + 1):
        try:
            check_tp(config, tp)
        except ConfigError:
            continue
        out.append(tp)
    return out


def rank_config(config: ModelConfig, tp: int) -> ModelConfig:
    """The shape one rank's attention sees: its query heads and KV heads."""
    check_tp(config, tp)
    if tp == 1:
        return config
    return dataclasses.replace(config, num_heads=config.num_heads // tp, num_kv_heads=max(1, config.num_kv_heads // tp))


def linears(config: ModelConfig, tp: int = 1) -> list[Linear]:
    """Every decoder layer's q/k/v/o and gate/up/down projections as one rank holds them."""
    rc = rank_config(config, tp)
    d, f, hd = config.hidden_size, config.intermediate_size // tp, config.head_dim
    q, kv = rc.num_heads * hd, rc.num_kv_heads * hd
    per_layer = [Linear(d, q, config.qkv_bias), Linear(d, kv, config.qkv_bias), Linear(d, kv, config.qkv_bias), Linear(q, d, False)]
    ffn = [Linear(d, f, False), Linear(d, f, False)] if config.activation == "swiglu" else [Linear(d, f, False)]
    return (per_layer + ffn + [Linear(f, d, False)]) * config.num_layers


def gate_numel(config: ModelConfig) -> int:
    """One hybrid layer's gate network (Linear d→d/4, SiLU, Linear→1 or →heads)."""
    d = config.hidden_size
    gate_out = config.num_heads if config.hybrid_gate == "head" else 1
    return d * (d // 4) + d // 4 + (d // 4) * gate_out + gate_out


def float_numel(config: ModelConfig, tp: int = 1, vocab_parallel: bool = True) -> int:
    """Parameters that stay in float when the projections are quantized: embeddings and LM head
    (split by vocabulary over the ranks where ``vocab_parallel``, as the engine's tensor parallelism
    does; whole on each, as training's does), norms and the hybrid gates (replicated)."""
    d = config.hidden_size
    vocab = -(-config.vocab_size // tp) if vocab_parallel else config.vocab_size
    norm = d * (2 if config.norm == "layernorm" else 1)
    layers = sum(2 * norm + (gate_numel(config) if kind == "hybrid" else 0) for kind in config.attention)
    return vocab * d * (1 if config.tie_embeddings else 2) + layers + norm


def buffer_bytes(config: ModelConfig) -> int:
    """The rotary frequencies (float32, rebuilt at load)."""
    return config.head_dim // 2 * 4


def linear_bytes(layer: Linear, fmt: str, dtype_bytes: int, group_size: int) -> int:
    """Bytes of one projection in ``fmt``: float, or GPTQ's packed codes, zeros, fp16 scales and
    int32 ``g_idx`` (its bias stays in float)."""
    bias = layer.out_features * dtype_bytes if layer.bias else 0
    if fmt not in QUANT_BITS:
        return layer.in_features * layer.out_features * DTYPE_BYTES[fmt] + bias
    bits = QUANT_BITS[fmt]
    groups = group_count(layer.in_features, group_size)
    codes = layer.in_features * layer.out_features * bits // 8
    zeros = groups * layer.out_features * bits // 8
    return codes + zeros + groups * layer.out_features * 2 + layer.in_features * 4 + bias


def weight_bytes(config: ModelConfig, fmt: str, tp: int = 1, float_dtype: str = "bfloat16", group_size: int = 128) -> int:
    """One rank's weights in ``fmt`` (a float dtype, or ``int8``/``int4`` GPTQ with ``group_size``,
    the rest of the model in ``float_dtype``)."""
    if fmt not in WEIGHT_FORMATS:
        raise ConfigError(f"weight format {fmt!r} is not one of {WEIGHT_FORMATS}")
    rest = DTYPE_BYTES[fmt if fmt in DTYPE_BYTES else float_dtype]
    return float_numel(config, tp) * rest + sum(linear_bytes(lin, fmt, rest, group_size) for lin in linears(config, tp)) + buffer_bytes(config)


def parameter_count(config: ModelConfig, tp: int = 1, vocab_parallel: bool = True) -> int:
    """Parameters one rank holds (``tp=1``: :meth:`ModelConfig.num_parameters`)."""
    return float_numel(config, tp, vocab_parallel) + sum(lin.in_features * lin.out_features + (lin.out_features if lin.bias else 0) for lin in linears(config, tp))


def parameter_tensors(config: ModelConfig) -> int:
    """How many parameter tensors the model has (AdamW keeps a step counter for each)."""
    norm = 2 if config.norm == "layernorm" else 1
    per_layer = 2 * norm + 4 + (3 if config.qkv_bias else 0) + (3 if config.activation == "swiglu" else 2)
    gates = 4 * sum(kind == "hybrid" for kind in config.attention)
    return per_layer * config.num_layers + gates + norm + (1 if config.tie_embeddings else 2)


# -- the KV cache ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class KVCache:
    """The engine's pool for ``batch`` sequences of ``context`` tokens: blocks in each group, bytes,
    and those bytes by what they hold."""

    blocks: int
    window_blocks: int
    block_size: int
    bytes: int
    by_kind: dict[str, int]


def kv_cache(config: ModelConfig, context: int, batch: int, dtype: str, block_size: int = 16, max_chunk: int = 2048, tp: int = 1) -> KVCache:
    """One rank's KV pool for ``batch`` sequences of ``context`` tokens (``max_chunk``: the engine's
    ``max_num_batched_tokens``, which bounds how far a prefill chunk reaches into the window group)."""
    rc = rank_config(config, tp)
    element = torch.empty((), dtype=getattr(torch, dtype)).dtype
    full = -(-context // block_size)
    blocks = batch * full
    window_blocks = 0
    if splits_window(rc):
        compress = rc.hybrid_compress_block if compressed_layers(rc) else None
        window_blocks = batch * WindowGroup(0, compress, max_chunk).span(rc.window_for(context), block_size)
    total = blocks * bytes_per_block(rc, block_size, element) + window_blocks * (bytes_per_block(rc, block_size, element, "window") if window_blocks else 0)
    # the same bytes by what they hold: per layer, K and V of Hkv heads
    row = 2 * rc.num_kv_heads * rc.head_dim * DTYPE_BYTES[dtype]
    windowed = set(windowed_layers(rc)) if window_blocks else set()
    pooled = compressed_layers(rc)
    by_kind: dict[str, int] = {}
    for i, kind in enumerate(rc.attention):
        key = "compressed hybrid (window)" if i in pooled else (f"{kind} (window)" if i in windowed else kind)
        by_kind[key] = by_kind.get(key, 0) + row * block_size * (window_blocks if i in windowed else blocks)
    if pooled:
        by_kind["compressed hybrid (pooled K/V)"] = len(pooled) * row * blocks * entries_per_block(rc, block_size)
    return KVCache(blocks, window_blocks, block_size, total, by_kind)


# -- training ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Activations:
    """Bytes autograd keeps from one forward until its backward: ``saved`` (all of it once the loss
    is computed) and ``peak`` (the most held at once in the backward: with checkpointing, one layer
    recomputed; always, the logits' gradient beside the log-softmax it comes from)."""

    saved: int
    peak: int


def _attention_saved(config: ModelConfig, kind: str, seq: int, a: int) -> int:
    """One sequence's bytes one attention layer saves (a: activation element size)."""
    h, hk, hd = config.num_heads, config.num_kv_heads, config.head_dim
    core = lambda rows: rows * (h * hd * a + h * 4)  # noqa: E731 - SDPA's output and float32 log-sum-exp
    saved = seq * (h + 2 * hk) * hd * a  # rotated q and k, and v, as SDPA saves them
    if kind == "global":
        return saved + core(seq)
    w = config.window_for(seq)
    if seq <= w:  # the window covers every key: one causal call
        local = core(seq)
    else:  # blocked: the first window causally, then blocks of queries over overlapping key spans
        block = min(w, max(64, w // 16))
        blocks = -(-(seq - w) // block)
        span = w + block - 1
        local = core(w) + blocks * block * h * hd * a + core(blocks * block) + 2 * blocks * span * hk * hd * a + block * span * a
        local += seq * h * hd * a  # the joined output
    if kind == "local":
        return saved + local
    gate_out = h if config.hybrid_gate == "head" else 1
    gate = seq * (2 * (config.hidden_size // 4) * a + 2 * gate_out * a)  # the gate MLP's hidden, its sigmoid and 1 - g
    if config.hybrid_global == "compressed":
        c = config.hybrid_compress_block
        pooled, rows = seq // c, max(0, seq - c + 1) if seq >= c else 0
        glob = 2 * pooled * hk * hd * a + rows * h * hd * a + core(rows) + rows * pooled * a + seq * h * hd * a
    else:
        glob = core(seq)
    return saved + local + gate + glob + seq * h * hd * a  # + the mixed output


def activations(config: ModelConfig, micro_batch: int, seq: int, precision: str = "fp32", checkpointing: bool = False, tp: int = 1) -> Activations:
    """Training activations of one micro-batch of ``micro_batch`` sequences of ``seq`` tokens on one
    tensor-parallel rank (its heads and FFN neurons; the residual stream, norms and logits whole)."""
    rc = rank_config(config, tp)
    a, r = PRECISION_BYTES[precision], 4  # r: the float32 residual stream and norms (parameters stay float32)
    d, f = config.hidden_size, config.intermediate_size // tp
    cast = d * a if a != r else 0  # autocast's copy of a norm's output for the next matmul
    norm = (3 * d + 1) * r + cast if config.norm == "rmsnorm" else (2 * d + 2) * r + cast
    tokens = micro_batch * seq
    base = tokens * (8 + norm + config.vocab_size * 4) + 2 * seq * config.head_dim * r  # ids, final norm, log-softmax; cos/sin
    layers = []
    for i, kind in enumerate(config.attention):
        ffn = (4 if config.activation == "swiglu" else 2) * f * a
        ffn += f * a * ((config.ffn[i] == "topk" and config.topk_gradient == "masked") + (config.dropout > 0))
        layers.append(tokens * (2 * norm + ffn) + micro_batch * _attention_saved(rc, kind, seq, a))
    logits_grad = tokens * config.vocab_size * 4
    if checkpointing:
        saved = base + config.num_layers * tokens * d * r
        return Activations(saved, saved + max(layers) + logits_grad)
    saved = base + sum(layers)
    return Activations(saved, saved + logits_grad)


@dataclasses.dataclass(frozen=True)
class TrainState:
    """Bytes of training's state on one rank: float32 parameters (the master weights), their
    gradients, AdamW's moments and step counters, and under autocast the half-precision copies of
    the matrices it keeps for the step."""

    parameters: int
    gradients: int
    optimizer: int
    autocast_copies: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.autocast_copies


def train_state(config: ModelConfig, precision: str = "fp32", tp: int = 1, shards: int = 1) -> TrainState:
    """One rank's share with ``tp``-way tensor parallelism and parameters, gradients and optimizer
    state sharded over ``shards`` ranks (FSDP; 1: every rank holds its whole TP shard)."""
    numel = parameter_count(config, tp, vocab_parallel=False)
    tensors = parameter_tensors(config)
    shard = lambda n: math.ceil(n / shards)  # noqa: E731
    matrices = sum(lin.in_features * lin.out_features for lin in linears(config, tp)) + config.hidden_size * config.vocab_size
    copies = matrices * PRECISION_BYTES[precision] if precision != "fp32" else 0
    return TrainState(shard(numel) * 4, shard(numel) * 4, shard(numel) * 8 + tensors * 4, copies)


def layer_parameters(config: ModelConfig, tp: int = 1) -> int:
    """The largest decoder layer's parameters on one rank: what FSDP gathers whole to compute it."""
    norm = config.hidden_size * (2 if config.norm == "layernorm" else 1)
    projections = sum(lin.in_features * lin.out_features + (lin.out_features if lin.bias else 0) for lin in linears(config, tp))
    hybrid = any(kind == "hybrid" for kind in config.attention)
    return projections // config.num_layers + 2 * norm + (gate_numel(config) if hybrid else 0)
