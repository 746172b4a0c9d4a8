"""torch's int4 CPU kernel (``aten._weight_int4pack_mm_for_cpu``, torch >= 2.6) as an int4 backend.

The codes are repacked once (``_convert_weight_to_int4pack_for_cpu`` on [out, in] codes) and the
scales and zeros become [in/g, out, 2] in the kernel's float domain, where it computes
``w = (q − 8)·scale + zero``: GPTQ's ``scale·(q − z)`` is that with ``zero = (8 − z)·scale``. It takes
bfloat16 activations (its float32 path is a slow fallback), so inputs are cast to bf16 and outputs
back. It serves CPUs where r1kit's own kernel (:mod:`r1kit.quant.int4.cpu_kernel`) is not built, and
outputs that are a multiple of 16 but not of 32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from r1kit.quant.int4 import cpu_layout

if TYPE_CHECKING:
    from r1kit.quant.int4_linear import QuantLinear

NAME = "torch-kernel"
BITS = 4


@dataclass(frozen=True)
class TorchKernelState:
    """The kernel's packed weight, bf16 scales-and-zeros, the input order (or None), the kernel group."""

    packed: torch.Tensor
    scale_zero: torch.Tensor
    order: torch.Tensor | None
    group: int
    out_features: int
    bias: torch.Tensor | None


def installed() -> bool:
    """Whether this torch has the kernel (torch >= 2.6)."""
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


def fits(in_features: int, out_features: int, group: int) -> str | None:
    """Why the kernel cannot take a product of this shape here, or None (the shared rules: :mod:`cpu_layout`)."""
    return None if installed() else "this torch has no _weight_int4pack_mm_for_cpu (torch < 2.6)"


def available(layer: QuantLinear, device: torch.device, dtype: torch.dtype) -> str | None:
    return cpu_layout.reason(layer, device, fits, BITS)


def prepare(layer: QuantLinear) -> TorchKernelState:
    return pack(*cpu_layout.kernel_inputs(layer), bias=layer.bias)


def pack(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, order: torch.Tensor | None, group: int,
         bias: torch.Tensor | None = None) -> TorchKernelState:
    """The kernel's state from :class:`~r1kit.quant.int4.cpu_layout.KernelInputs` (and a bias to add)."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.t().contiguous().to(torch.int32), 1)
    scale_zero = torch.stack((scales, (8 - zeros) * scales), dim=-1).to(torch.bfloat16).contiguous()
    return TorchKernelState(packed, scale_zero, order, group, codes.shape[1], bias)


def matmul(x: torch.Tensor, state: TorchKernelState) -> torch.Tensor:
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if state.order is not None:
        x2 = x2.index_select(1, state.order)
    if x2.dtype != torch.bfloat16:
        x2 = x2.to(torch.bfloat16)
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(x2 if x2.is_contiguous() else x2.contiguous(), state.packed, state.group, state.scale_zero)
    if x.dtype != torch.bfloat16:
        out = out.to(x.dtype)
    out = out.view(*shape[:-1], state.out_features)
    return out if state.bias is None else out + state.bias.to(x.dtype)
