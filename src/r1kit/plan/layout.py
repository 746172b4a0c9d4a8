"""The parallel layout a plan recommends for the given devices, and what to change when nothing fits.

Serving: the smallest tensor-parallel size whose rank holds its weights, the KV cache of the batch
at the context and the engine's working memory within ``utilization`` of a device (the rest is the
headroom: the CUDA context, the allocator's fragmentation); the other devices serve replicas.
Training: FSDP (parameters, gradients and AdamW state sharded over the data-parallel ranks) times
tensor parallelism, the smallest TP size that fits, without activation checkpointing before with it.
A plan that does not fit says so and names what would: quantized weights, more devices, a shorter
context or a smaller batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from r1kit.config import ModelConfig
from r1kit.plan.devices import Devices
from r1kit.plan.memory import (
    DTYPE_BYTES,
    activations,
    kv_cache,
    layer_parameters,
    train_state,
    valid_tp,
    weight_bytes,
)


@dataclasses.dataclass(frozen=True)
class Workload:
    """What is planned for: serving ``batch`` sequences of ``context`` tokens with weights in
    ``weights`` (a float dtype, int8 or int4), and training micro-batches of ``micro_batch``
    sequences of ``context`` tokens at ``precision``."""

    context: int
    batch: int
    micro_batch: int
    dtype: str
    weights: str
    precision: str
    group_size: int = 128
    block_size: int = 16
    max_chunk: int = 2048
    utilization: float = 0.9


def serve_rank(config: ModelConfig, work: Workload, tp: int) -> dict[str, int]:
    """One serving rank's bytes: weights, KV cache, and the engine's working memory for a step (one
    layer's widest tensors over a chunk, and the batch's logits in float32)."""
    weights = weight_bytes(config, work.weights, tp, work.dtype, work.group_size)
    kv = kv_cache(config, work.context, work.batch, work.dtype, work.block_size, work.max_chunk, tp).bytes
    hd, heads = config.head_dim, (config.num_heads + 2 * config.num_kv_heads) // tp or 1
    chunk = min(work.max_chunk, work.context * work.batch)
    work_bytes = chunk * (heads * hd + 2 * config.intermediate_size // tp + 2 * config.hidden_size) * DTYPE_BYTES[work.dtype]
    work_bytes += work.batch * config.vocab_size * 4
    return {"weights": weights, "kv_cache": kv, "workspace": work_bytes, "total": weights + kv + work_bytes}


def train_rank(config: ModelConfig, work: Workload, tp: int, dp: int, checkpointing: bool) -> dict[str, int]:
    """One training rank's bytes with FSDP over ``dp`` ranks and ``tp``-way tensor parallelism: its
    shard of the state, the whole of the largest layer FSDP gathers to compute it (parameters and
    gradients, float32), and the activations of its micro-batch at their peak."""
    state = train_state(config, work.precision, tp, dp)
    gathered = 2 * layer_parameters(config, tp) * 4 if dp > 1 else 0
    act = activations(config, work.micro_batch, work.context, work.precision, checkpointing, tp)
    out = dataclasses.asdict(state) | {"fsdp_gathered_layer": gathered, "activations": act.peak}
    return out | {"total": sum(out.values())}


def usable(devices: Devices, work: Workload) -> int:
    return int(devices.device.memory * work.utilization)


def serving_fit(config: ModelConfig, devices: Devices, work: Workload) -> int | None:
    """The smallest valid tensor-parallel size at which a serving rank fits (None: none does)."""
    limit = usable(devices, work)
    return next((tp for tp in valid_tp(config, devices.count) if serve_rank(config, work, tp)["total"] <= limit), None)


def training_fit(config: ModelConfig, devices: Devices, work: Workload) -> tuple[int, bool] | None:
    """(TP size, activation checkpointing) of the first training layout that fits, checkpointing off
    before on and the smallest TP first (None: none does)."""
    limit = usable(devices, work)
    for checkpointing in (False, True):
        for tp in valid_tp(config, devices.count):
            if train_rank(config, work, tp, devices.count // tp, checkpointing)["total"] <= limit:
                return tp, checkpointing
    return None


def plan_serving(config: ModelConfig, devices: Devices, work: Workload) -> dict[str, Any]:
    """The serving layout (see the module's note) and, where it does not fit, what would."""
    fit = serving_fit(config, devices, work)
    tp = fit or valid_tp(config, devices.count)[-1]
    rank = serve_rank(config, work, tp)
    return {"fits": fit is not None, "tensor_parallel": tp, "replicas": devices.count // tp, "per_rank": rank,
            "headroom": usable(devices, work) - rank["total"], "advice": [] if fit else serving_advice(config, devices, work)}


def serving_advice(config: ModelConfig, devices: Devices, work: Workload) -> list[str]:
    """What would fit instead: quantized weights, more devices, a shorter context, a smaller batch."""
    advice = []
    smaller = {"int4": (), "int8": ("int4",)}.get(work.weights, ("int8", "int4"))
    for fmt in smaller:
        tp = serving_fit(config, devices, dataclasses.replace(work, weights=fmt))
        if tp is not None:
            advice.append(f"quantize the weights to {fmt} (GPTQ, group {work.group_size}): fits with tensor parallel size {tp}")
            break
    more = _more_devices(lambda more: serving_fit(config, more, work) is not None, devices)
    if more:
        advice.append(f"use {more}x{devices.device.name}")
    tp, limit = valid_tp(config, devices.count)[-1], usable(devices, work)
    context = _largest(lambda n: serve_rank(config, dataclasses.replace(work, context=n), tp)["total"], limit, work.context, work.block_size)
    if context:
        advice.append(f"a context of at most {context} tokens at batch {work.batch} (tensor parallel size {tp})")
    batch = _largest(lambda b: serve_rank(config, dataclasses.replace(work, batch=b), tp)["total"], limit, work.batch, 1)
    if batch:
        advice.append(f"a batch of at most {batch} sequences at context {work.context} (tensor parallel size {tp})")
    if not advice:
        advice.append("no quantization, device count up to 64, context or batch found that fits: choose a larger device")
    return advice


def plan_training(config: ModelConfig, devices: Devices, work: Workload) -> dict[str, Any]:
    """The training layout (see the module's note) and, where it does not fit, what would."""
    fit = training_fit(config, devices, work)
    tp, checkpointing = fit or (valid_tp(config, devices.count)[-1], True)
    dp, limit = devices.count // tp, usable(devices, work)
    rank = train_rank(config, work, tp, dp, checkpointing)
    out = {"fits": fit is not None, "tensor_parallel": tp, "fsdp": dp, "activation_checkpointing": checkpointing, "per_rank": rank,
           "headroom": limit - rank["total"], "advice": []}
    if fit is not None:
        return out
    more = _more_devices(lambda more: training_fit(config, more, work) is not None, devices)
    if more:
        out["advice"].append(f"use {more}x{devices.device.name}")
    mb = _largest(lambda m: train_rank(config, dataclasses.replace(work, micro_batch=m), tp, dp, True)["total"], limit, work.micro_batch, 1)
    if mb:
        out["advice"].append(f"a micro-batch of at most {mb} sequences (activation checkpointing on; accumulate gradients to keep the batch)")
    ctx = _largest(lambda n: train_rank(config, dataclasses.replace(work, context=n, micro_batch=1), tp, dp, True)["total"], limit, work.context, work.block_size)
    if ctx:
        out["advice"].append(f"sequences of at most {ctx} tokens at micro-batch 1 (activation checkpointing on)")
    if not out["advice"]:
        out["advice"].append("its parameters, gradients and AdamW state alone do not fit: choose more or larger devices")
    return out


def _more_devices(fits, devices: Devices) -> int | None:
    """The fewest devices of this kind (up to 64) for which ``fits(devices)`` holds."""
    if devices.device.kind == "cpu":
        return None
    return next((n for n in range(devices.count + 1, 65) if fits(dataclasses.replace(devices, count=n))), None)


def _largest(total_at, limit: int, start: int, step: int) -> int | None:
    """The largest multiple of ``step`` up to ``start`` at which ``total_at`` fits (None: not even ``step``)."""
    if total_at(step) > limit:
        return None
    lo, hi = 1, max(1, start // step)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if total_at(mid * step) <= limit else (lo, mid - 1)
    return lo * step
