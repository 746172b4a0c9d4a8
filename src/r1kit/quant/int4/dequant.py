"""The reference int4 backend: unpack the GPTQ tensors to a float weight, then ``F.linear``.

It runs anywhere, in any dtype, and is the only backend with a backward (``F.linear``'s), so a
forward that needs gradients always takes it. The kernels are held to it in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from r1kit.quant import packing

if TYPE_CHECKING:
    from r1kit.quant.int4_linear import QuantLinear

NAME = "dequant"


@dataclass(frozen=True)
class DequantState:
    """The layer's stored tensors themselves (no copy)."""

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor
    bits: int
    zero_offset: int
    bias: torch.Tensor | None


def available(layer: QuantLinear, device: torch.device, dtype: torch.dtype) -> str | None:
    return None


def prepare(layer: QuantLinear) -> DequantState:
    return DequantState(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bits, layer.zero_offset, layer.bias)


def matmul(x: torch.Tensor, state: DequantState) -> torch.Tensor:
    weight = packing.dequantize(state.qweight, state.qzeros, state.scales, state.g_idx, state.bits, state.zero_offset, x.dtype)
    return F.linear(x, weight, None if state.bias is None else state.bias.to(x.dtype))
