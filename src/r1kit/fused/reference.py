"""The plain PyTorch formulas the fused kernels compute: what the tests and the self-check hold the
kernels to, and what the swapped layers run where no kernel is used (the CPU tests' wiring check).

Each matches the eager model's own computation up to rounding: the residual add rounds in its dtype
as ``x + delta`` does; norms compute in float32 and round once; the GELU is the tanh approximation
the model's FFN uses. This module never imports Triton.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def add_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
             eps: float, rms: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(y, h)``: ``h = x + delta`` (None without ``delta``, and then ``h = x``) and
    ``y = norm(h) · weight (+ bias)``, an RMSNorm (``rms``) or a LayerNorm over the last dimension,
    in float32, in ``h``'s and ``weight``'s promoted dtype."""
    h = x if delta is None else x + delta
    hf = h.float()
    if not rms:
        hf = hf - hf.mean(-1, keepdim=True)
    y = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(torch.promote_types(h.dtype, weight.dtype)), (None if delta is None else h)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) · up``, in float32, rounded once."""
    return (F.silu(gate.float()) * up.float()).to(torch.promote_types(gate.dtype, up.dtype))


def linear_gelu(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``gelu(x · weightᵀ)`` with the tanh approximation (a GELU FFN's up projection and activation)."""
    return F.gelu(F.linear(x, weight), approximate="tanh")
