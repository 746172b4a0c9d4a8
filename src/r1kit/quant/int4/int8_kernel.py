"""r1kit's int8 CPU kernel (:mod:`r1kit.quant.cpu_int8`, integer dot products) as the CPU backend of
8-bit GPTQ layers.

It takes float32 or bfloat16 activations and returns the same dtype (other float dtypes go through
float32), with the bias and the act-order permutation applied inside the one call. It quantizes the
activations to int8 in blocks of 32 as it goes (llama.cpp's q8_0 × q8_0), so it is held to the
dequantize reference within that rounding. It runs where a C compiler built the library (with
AVX512-VNNI, or its portable loop) and it passed its self-check, and where the output is a whole
number of 32-column tiles and each kernel group whole 32-input blocks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from r1kit.quant import cpu_int8
from r1kit.quant.int4 import cpu_kernel, cpu_layout

if TYPE_CHECKING:
    from r1kit.quant.int4_linear import QuantLinear

NAME = "r1kit-int8-kernel"
BITS = 8


def fits(in_features: int, out_features: int, group: int) -> str | None:
    """Why the kernel cannot take a product of this shape here, or None."""
    if cpu_int8.load() is None:
        return "r1kit's int8 CPU kernel is not built here (no C compiler, or it failed its self-check)"
    if not cpu_int8.fits(in_features, out_features, group):
        return f"[{in_features}, {out_features}] in groups of {group} does not fit its layout (out_features % 32, groups of whole 32-input blocks)"
    return None


def available(layer: QuantLinear, device: torch.device, dtype: torch.dtype) -> str | None:
    return cpu_layout.reason(layer, device, fits, BITS)


def prepare(layer: QuantLinear) -> cpu_kernel.CpuKernelState:
    return pack(*cpu_layout.kernel_inputs(layer), bias=layer.bias)


def pack(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, order: torch.Tensor | None, group: int,
         bias: torch.Tensor | None = None) -> cpu_kernel.CpuKernelState:
    """The kernel's state from :class:`~r1kit.quant.int4.cpu_layout.KernelInputs` (and a bias to add)."""
    return cpu_kernel.CpuKernelState(cpu_int8.pack(codes, scales, zeros, order, group), bias, cpu_int8.load())


matmul = cpu_kernel.matmul  # the same call: the state names its kernel
