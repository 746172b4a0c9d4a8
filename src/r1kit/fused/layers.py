"""The model's layers computing through fused operations: variants that :func:`r1kit.fused.apply.apply_fused_kernels`
swaps in (:func:`~r1kit.model.transformer.specialize`: the same parameters under the same names).

Each variant holds an :class:`FusedOps`, the three operations it calls: the Triton kernels on a GPU,
or their PyTorch references (which is how the CPU tests check the swap without a kernel). The
model's classes know nothing of them: the variants override the seams the model offers
(``DecoderLayer.add_norm``, ``DenseFFN.activations``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from r1kit.fused import reference
from r1kit.model.ffn import DenseFFN
from r1kit.model.transformer import DecoderLayer, RMSNorm


@dataclass(frozen=True)
class FusedOps:
    """The fused operations, with the signatures of :mod:`r1kit.fused.reference`."""

    add_norm: Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
    swiglu: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    linear_gelu: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


REFERENCE_OPS = FusedOps(reference.add_norm, reference.swiglu, reference.linear_gelu)


class FusedRMSNorm(RMSNorm):
    """An RMSNorm whose pass also takes the residual add before it (:meth:`add_forward`)."""

    ops: FusedOps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.add_norm(x, None, self.weight, None, self.eps, True)[0]

    def add_forward(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x + delta, self(x + delta))`` in one pass."""
        y, h = self.ops.add_norm(x, delta, self.weight, None, self.eps, True)
        return h, y


class FusedLayerNorm(nn.LayerNorm):
    """A LayerNorm (one normalised dimension, with its weight) whose pass also takes the residual add."""

    ops: FusedOps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.add_norm(x, None, self.weight, self.bias, self.eps, False)[0]

    def add_forward(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x + delta, self(x + delta))`` in one pass."""
        y, h = self.ops.add_norm(x, delta, self.weight, self.bias, self.eps, False)
        return h, y


FUSED_NORMS = (FusedRMSNorm, FusedLayerNorm)


class FusedDecoderLayer(DecoderLayer):
    """A decoder layer whose residual add and the norm after it are one pass where that norm is fused."""

    def add_norm(self, x: torch.Tensor, delta: torch.Tensor, norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(norm, FUSED_NORMS):
            return norm.add_forward(x, delta)
        return super().add_norm(x, delta, norm)


class SwiGLUActivation:
    """Mixed into a dense SwiGLU FFN's class (:func:`swiglu_variant`): ``silu(gate)·up`` in one pass
    over whatever ``project_gate_up`` returns (two linears, or the halves of one packed product).
    A dense FFN reads only the hidden state (the selector ranks neurons for Top-K, which keeps its
    own path), so the fused result stands for both."""

    ops: FusedOps

    def activations(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = self.project_gate_up(x)
        h = self.ops.swiglu(gate, up)
        return h, h


class FusedSwiGLUFFN(SwiGLUActivation, DenseFFN):
    """The model's dense SwiGLU FFN with its activation in one pass."""


@functools.cache
def swiglu_variant(cls: type[DenseFFN]) -> type[DenseFFN]:
    """``cls`` with :class:`SwiGLUActivation`: :class:`FusedSwiGLUFFN` for the model's own FFN, else
    a class made for ``cls``, since the FFN may already be another package's variant (the engine's
    packed gate/up product) whose projection must be kept."""
    if cls is DenseFFN:
        return FusedSwiGLUFFN
    return type(f"SwiGLU{cls.__name__}", (SwiGLUActivation, cls), {"__module__": __name__, "__doc__": SwiGLUActivation.__doc__})


class FusedGELUFFN(DenseFFN):
    """A dense GELU FFN whose up projection carries the GELU as its epilogue. Under autocast the
    product runs in the autocast dtype, as ``nn.Linear`` would."""

    ops: FusedOps

    def activations(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if type(self.up_proj) is not nn.Linear:  # swapped since (e.g. quantized): its own forward
            return super().activations(x)
        weight = self.up_proj.weight
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight = x.to(dtype), weight.to(dtype)
        h = self.ops.linear_gelu(x, weight)
        return h, h  # a GELU FFN's selector is its hidden state
