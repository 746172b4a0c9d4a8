"""The memory planner behind ``r1kit plan``: what a model needs on given devices, and how to lay it out.

:func:`make_plan` counts, from a model's config alone (no weight is loaded), the bytes of its
weights in every precision, the engine's KV cache at a context and batch, training's activations at
a micro-batch and AdamW's state (:mod:`r1kit.plan.memory`), then recommends the tensor-parallel and
FSDP layout for the devices named (:mod:`r1kit.plan.layout`, :mod:`r1kit.plan.devices`). It reads the
configs of the model, quantization, engine and trainer; no stage imports it.
"""

from __future__ import annotations

from typing import Any

from r1kit.plan.devices import Devices
from r1kit.plan.layout import Workload, plan_serving, plan_training
from r1kit.plan.memory import (
    WEIGHT_FORMATS,
    activations,
    kv_cache,
    parameter_count,
    train_state,
    weight_bytes,
)
from r1kit.plan.source import ModelSource

__all__ = ["Workload", "make_plan"]


def make_plan(source: ModelSource, devices: Devices, work: Workload) -> dict[str, Any]:
    """The whole plan as a JSON-ready mapping (bytes as integers): model, devices, settings, weights
    per format, KV cache, training memory on one device, and the serving and training layouts."""
    config = source.config
    kv = kv_cache(config, work.context, work.batch, work.dtype, work.block_size, work.max_chunk)
    state = train_state(config, work.precision)
    return {
        "model": {"source": source.where, "parameters": parameter_count(config), "layers": config.num_layers,
                  "attention": _counts(config.attention), "ffn": _counts(config.ffn),
                  "checkpoint_quantization": None if source.quant is None else f"gptq int{source.quant.bits} group {source.quant.group_size}"},
        "devices": {"gpus": devices.label, "count": devices.count, "device": devices.device.description,
                    "memory": devices.device.memory, "usable": int(devices.device.memory * work.utilization), "utilization": work.utilization},
        "settings": {"context": work.context, "batch": work.batch, "micro_batch": work.micro_batch, "dtype": work.dtype,
                     "weights": work.weights, "precision": work.precision, "group_size": work.group_size, "block_size": work.block_size,
                     "max_num_batched_tokens": work.max_chunk},
        "weights": {fmt: weight_bytes(config, fmt, 1, work.dtype, work.group_size) for fmt in WEIGHT_FORMATS},
        "kv_cache": {"bytes": kv.bytes, "per_sequence": kv.bytes // work.batch, "blocks": kv.blocks, "window_blocks": kv.window_blocks,
                     "block_size": kv.block_size, "by_kind": kv.by_kind},
        "training": {
            "activations": {
                "without_checkpointing": activations(config, work.micro_batch, work.context, work.precision, False).__dict__,
                "with_checkpointing": activations(config, work.micro_batch, work.context, work.precision, True).__dict__,
            },
            "parameters": state.parameters, "gradients": state.gradients, "optimizer": state.optimizer,
            "autocast_copies": state.autocast_copies,
        },
        "serve": plan_serving(config, devices, work),
        "train": plan_training(config, devices, work),
    }


def _counts(kinds: tuple[str, ...]) -> dict[str, int]:
    return {kind: kinds.count(kind) for kind in dict.fromkeys(kinds)}
