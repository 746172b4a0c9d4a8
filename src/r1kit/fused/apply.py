"""Swap a model's norms, residual adds and FFN activations for fused ones, after a self-check.

:func:`apply_fused_kernels` is applied from outside, like weight packing and tensor parallelism:
the trainer calls it on CUDA when ``train.fused_kernels`` is on, the engine on its CUDA copy of the
model. The kernels are first run on the model's device, in each dtype asked for, on small
problems against their PyTorch references, forward and backward (:func:`verified`, once per
process); where Triton is missing, the device is not a GPU, or a kernel fails to compile, launch or
agree, the model is left as it was and the reason is logged, as the int4 and decode-attention
kernels fall back. What is swapped, where its weights are plain parameters:

* every :class:`~r1kit.model.transformer.RMSNorm` and one-dimensional ``nn.LayerNorm`` with a weight;
* every :class:`~r1kit.model.transformer.DecoderLayer`, so its residual add joins the norm after it;
* a dense SwiGLU FFN's activation (also over the engine's packed gate/up product);
* a dense GELU FFN's up projection, with the GELU as its epilogue.

Top-K FFNs keep their own path (they rank neurons by ``silu(gate)`` alone and gather rows).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from typing import Iterable

import torch
from torch import nn

from r1kit.fused import reference
from r1kit.fused.layers import (
    FusedDecoderLayer,
    FusedGELUFFN,
    FusedLayerNorm,
    FusedOps,
    FusedRMSNorm,
    swiglu_variant,
)
from r1kit.model.ffn import DenseFFN, TopKFFN
from r1kit.model.transformer import DecoderLayer, RMSNorm, specialize

log = logging.getLogger(__name__)

# the self-check's bound: max |Δ| against the float32 reference, relative to max |reference|
CHECK_RTOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


@functools.cache
def triton_ops() -> FusedOps:
    """The Triton kernels (imported at first use: importing them needs ``triton``)."""
    from r1kit.fused.linear_gelu import linear_gelu
    from r1kit.fused.residual_norm import add_norm
    from r1kit.fused.swiglu import swiglu

    return FusedOps(add_norm, swiglu, linear_gelu)


def _compare(name: str, got: Iterable[torch.Tensor], want: Iterable[torch.Tensor], dtype: torch.dtype) -> None:
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        scale = float(w.double().abs().max())
        error = float((g.double() - w.double()).abs().max())
        if g.shape != w.shape or not error <= CHECK_RTOL[dtype] * max(scale, 1e-6):
            raise RuntimeError(f"fused self-check mismatch: {name} output/gradient {i} in {dtype}: max |Δ| {error:.2e} of max |reference| {scale:.2e}")


def _run(fn, inputs: list[torch.Tensor | None], seed: int) -> list[torch.Tensor]:
    """``fn``'s outputs and the gradients of its tensor inputs under a fixed random cotangent."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in inputs]
    outputs = fn(*leaves)
    outputs = [o for o in (outputs if isinstance(outputs, tuple) else (outputs,)) if o is not None]
    g = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=g).to(o.device)).sum() for o in outputs)
    loss.backward()
    return [o.detach() for o in outputs] + [t.grad for t in leaves if t is not None]


def self_check(ops: FusedOps, device: torch.device, dtype: torch.dtype) -> None:
    """Each of ``ops`` on small problems (widths that are not powers of two, a 16-row tile and a
    many-row one) against :mod:`r1kit.fused.reference` computed in float32, forward and backward
    (inputs' and weights' gradients). Raises where one is wrong."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype)

    def ref(fn):  # the reference on float32 copies of the input tensors
        return lambda *args: fn(*(a.float() if isinstance(a, torch.Tensor) else a for a in args))

    D, F, K, N = 80, 200, 96, 72
    for rms in (True, False):
        x, delta, w, b = rand(3, 7, D), rand(3, 7, D), rand(D), rand(D)
        bias = None if rms else b
        for d in (delta, None):
            got = _run(lambda *t: ops.add_norm(*t, 1e-6, rms), [x, d, w, bias], 1)
            want = _run(lambda *t: ref(reference.add_norm)(*t, 1e-6, rms), [x, d, w, bias], 1)
            _compare(f"add_norm(rms={rms}, residual={d is not None})", got, want, dtype)
    gate, up = rand(9, F), rand(9, F)
    _compare("swiglu", _run(ops.swiglu, [gate, up], 2), _run(ref(reference.swiglu), [gate, up], 2), dtype)
    for rows in (5, 40):
        x, w = rand(rows, K), rand(N, K, scale=K**-0.5)
        _compare(f"linear_gelu({rows} rows)", _run(ops.linear_gelu, [x, w], 3), _run(ref(reference.linear_gelu), [x, w], 3), dtype)


@functools.cache
def verified(ops: FusedOps, device: torch.device, dtype: torch.dtype) -> str | None:
    """None where ``ops`` pass :func:`self_check` on ``device`` in ``dtype`` (once per process), else why not."""
    try:
        with torch.inference_mode(False), torch.enable_grad():  # the check runs backwards, even from an engine
            self_check(ops, device, dtype)
        return None
    except Exception as exc:  # a compiler error, a launch failure, a wrong result: eager layers instead
        return f"the fused kernels failed their self-check on {device} for {dtype}: {exc!r}"


def unavailable(ops: FusedOps | None, device: torch.device, dtypes: Iterable[torch.dtype]) -> str | None:
    """Why ``ops`` (default: the Triton kernels, on CUDA only) cannot run on ``device`` in ``dtypes``; None where they can."""
    if ops is None:
        if device.type != "cuda":
            return f"the fused Triton kernels run on CUDA; the model is on {device}"
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install triton)"
        ops = triton_ops()
    return next((why for dtype in dict.fromkeys(dtypes) if (why := verified(ops, device, dtype)) is not None), None)


def _plain(module: nn.Module) -> bool:
    # a DTensor shard or a quantized layer keeps its own path
    return all(type(p) is nn.Parameter for p in module.parameters(recurse=False))


def _variant(module: nn.Module, ops: FusedOps) -> nn.Module | None:
    """``module``'s fused variant, or None where it has none."""
    if type(module) is RMSNorm and _plain(module):
        return specialize(module, FusedRMSNorm, ops=ops)
    if type(module) is nn.LayerNorm and module.weight is not None and len(module.normalized_shape) == 1 and _plain(module):
        return specialize(module, FusedLayerNorm, ops=ops)
    if type(module) is DecoderLayer:
        return specialize(module, FusedDecoderLayer)
    # a dense FFN whose activations are still DenseFFN's (not Top-K, not already fused)
    if isinstance(module, DenseFFN) and not isinstance(module, TopKFFN) and type(module).activations is DenseFFN.activations:
        if module.gated:
            return specialize(module, swiglu_variant(type(module)), ops=ops)
        if type(module) is DenseFFN and type(module.up_proj) is nn.Linear and module.up_proj.bias is None and _plain(module.up_proj):
            return specialize(module, FusedGELUFFN, ops=ops)
    return None


def _swap(parent: nn.Module, ops: FusedOps) -> int:
    # top down, each child's children under the child as swapped in (a variant holds its own copy of them)
    swapped = 0
    for name, child in list(parent.named_children()):
        variant = _variant(child, ops)
        if variant is not None:
            setattr(parent, name, variant)
            child, swapped = variant, swapped + 1
        swapped += _swap(child, ops)
    return swapped


def apply_fused_kernels(model: nn.Module, dtypes: Iterable[torch.dtype] | None = None, ops: FusedOps | None = None) -> int:
    """Swap ``model``'s layers for their fused variants in place (see the module's docstring); how
    many it swapped, 0 (with the reason logged) where the kernels cannot run here.

    ``dtypes``: the dtypes the layers will compute in (default: the model's; a trainer under
    autocast adds the autocast dtype), each checked. ``ops``: the operations to use (default: the
    Triton kernels, applied on CUDA only); any ``ops`` given are self-checked the same way on the
    model's device."""
    first = next(model.parameters())
    why = unavailable(ops, first.device, dtypes or (first.dtype,))
    if why is not None:
        log.warning("fused kernels not applied (the model keeps its eager layers): %s", why)
        return 0
    swapped = _swap(model, ops or triton_ops())
    log.info("fused kernels applied to %d layers", swapped)
    return swapped
