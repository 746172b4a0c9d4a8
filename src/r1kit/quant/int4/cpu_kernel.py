"""r1kit's own int4 CPU kernel (:mod:`r1kit.quant.cpu_int4`, AVX512-BF16) as an int4 backend.

It takes float32 or bfloat16 activations and returns the same dtype, with the bias and the
act-order permutation applied inside the one call; other float dtypes go through float32. It runs
where this CPU has AVX512-BF16 (and a C compiler built the library) and the output is a whole
number of its 32-column tiles; elsewhere torch's kernel serves (:mod:`r1kit.quant.int4.torch_kernel`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from r1kit.quant import cpu_int4
from r1kit.quant.cpu_matmul import CpuMatmul, PackedWeight
from r1kit.quant.int4 import cpu_layout

if TYPE_CHECKING:
    from r1kit.quant.int4_linear import QuantLinear

NAME = "r1kit-kernel"
BITS = 4


@dataclass(frozen=True)
class CpuKernelState:
    """The weights in a kernel's layout, the bias to add, and the loaded kernel (int4's, or int8's:
    :mod:`r1kit.quant.int4.int8_kernel` keeps its state in this record too)."""

    packed: PackedWeight
    bias: torch.Tensor | None
    kernel: CpuMatmul


def fits(in_features: int, out_features: int, group: int) -> str | None:
    """Why the kernel cannot take a product of this shape here, or None (the shared rules: :mod:`cpu_layout`)."""
    if cpu_int4.load() is None:
        return "r1kit's int4 CPU kernel is not built here (no AVX512-BF16 or no C compiler)"
    if not cpu_int4.fits(in_features, out_features, group):
        return f"[{in_features}, {out_features}] in groups of {group} does not fit its layout (out_features % {cpu_int4.TILE})"
    return None


def available(layer: QuantLinear, device: torch.device, dtype: torch.dtype) -> str | None:
    return cpu_layout.reason(layer, device, fits, BITS)


def prepare(layer: QuantLinear) -> CpuKernelState:
    return pack(*cpu_layout.kernel_inputs(layer), bias=layer.bias)


def pack(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, order: torch.Tensor | None, group: int,
         bias: torch.Tensor | None = None) -> CpuKernelState:
    """The kernel's state from :class:`~r1kit.quant.int4.cpu_layout.KernelInputs` (and a bias to add)."""
    return CpuKernelState(cpu_int4.pack(codes, scales, zeros, order, group), bias, cpu_int4.load())


def matmul(x: torch.Tensor, state: CpuKernelState) -> torch.Tensor:
    if x.dtype in (torch.float32, torch.bfloat16):  # what both kernels take
        return state.kernel(x, state.packed, state.bias)
    return state.kernel(x.float(), state.packed, state.bias).to(x.dtype)
