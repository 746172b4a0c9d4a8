"""SwiGLU's activation in one pass (Triton): ``h = silu(gate) · up``, and both gradients in one more.

Eagerly this is a SiLU (read ``gate``, write ``silu(gate)``) and a product (read both, write ``h``),
and the backward recomputes and multiplies in several more passes; here the forward reads ``gate``
and ``up`` once and writes ``h``, and the backward reads ``gate``, ``up`` and ``dh`` once and
writes ``dgate`` and ``dup`` (Liger's and Unsloth's SwiGLU kernels do the same). Nothing but the two
inputs is kept for the backward. ``gate`` and ``up`` may be strided views (the halves of one
gate/up product), read in place. Float32 inside, rounded once into the output (eager rounds
``silu(gate)`` first). Runs on CUDA, and on the CPU under Triton's interpreter for the tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024  # elements of a row per program


@triton.jit
def _swiglu_forward(gate_ptr, up_ptr, h_ptr, F, stride_gate, stride_up, stride_h, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    gate = tl.load(gate_ptr + row * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + row * stride_up + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(h_ptr + row * stride_h + cols, (gate * tl.sigmoid(gate) * up).to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward(dh_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, F, stride_dh, stride_gate, stride_up, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    dh = tl.load(dh_ptr + row * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + row * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + row * stride_up + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    # silu'(g) = σ(g)·(1 + g·(1 − σ(g)))
    tl.store(dgate_ptr + row * F + cols, (dh * up * sig * (1.0 + gate * (1.0 - sig))).to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + row * F + cols, (dh * gate * sig).to(dup_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])  # a view for the halves of a gate/up product
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


class SwiGLU(torch.autograd.Function):
    """:func:`swiglu` with its backward."""

    @staticmethod
    def forward(ctx, gate, up):
        if gate.shape != up.shape:
            raise ValueError(f"SwiGLU's gate {tuple(gate.shape)} and up {tuple(up.shape)} projections must have one shape")
        g2, u2 = _rows(gate), _rows(up)
        rows, F = g2.shape
        h = torch.empty((rows, F), dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
        if h.numel():
            _swiglu_forward[(rows, triton.cdiv(F, BLOCK))](g2, u2, h, F, g2.stride(0), u2.stride(0), h.stride(0), BLOCK=BLOCK)
        ctx.save_for_backward(g2, u2)
        ctx.shape = gate.shape
        return h.reshape(gate.shape)

    @staticmethod
    def backward(ctx, dh):
        g2, u2 = ctx.saved_tensors
        rows, F = g2.shape
        dh2 = _rows(dh)
        dgate, dup = torch.empty_like(g2, memory_format=torch.contiguous_format), torch.empty_like(u2, memory_format=torch.contiguous_format)
        if dgate.numel():
            _swiglu_backward[(rows, triton.cdiv(F, BLOCK))](dh2, g2, u2, dgate, dup, F, dh2.stride(0), g2.stride(0), u2.stride(0), BLOCK=BLOCK)
        return dgate.reshape(ctx.shape), dup.reshape(ctx.shape)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) · up`` as :func:`r1kit.fused.reference.swiglu` computes it, differentiable in both."""
    return SwiGLU.apply(gate, up)
