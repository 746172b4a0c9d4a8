"""r1kit's own int4 CPU kernel (``csrc/int4_matmul.c``): GPTQ 4-bit weights times float activations with
AVX512-BF16 dot products, where the CPU has them.

torch's int4 kernel (``aten._weight_int4pack_mm_for_cpu``) converts each code to bfloat16 and
multiplies in float32 lanes; at decode it reads the weights at about a third of this machine's memory
bandwidth, so an int4 decode step was bound by unpacking, not by memory. This kernel packs two input
rows per byte pair so that one widen, a mask, a shift and two table lookups give ``vdpbf16ps`` 64
multiply-adds from 32 bytes; it takes float32 or bfloat16 activations and returns the same type (no
casts around it), adds the bias and applies an act-order input permutation itself, all in one call.
The layout is in the C file's header. Where the CPU lacks AVX512-BF16 or nothing can be compiled,
:func:`load` returns None and int4 layers keep torch's kernel (:mod:`r1kit.quant.int4.torch_kernel`).
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from r1kit import native
from r1kit.quant import cpu_matmul
from r1kit.quant.cpu_matmul import TILE, CpuMatmul, PackedWeight, scale_zero

SOURCE = Path(__file__).parent / "csrc" / "int4_matmul.c"
FUNCTIONS = {torch.float32: "int4_matmul_f32", torch.bfloat16: "int4_matmul_bf16"}


def fits(in_features: int, out_features: int, group: int) -> bool:
    """Whether a [in, out] product in groups of ``group`` fits the layout (groups of whole pairs of input pairs)."""
    return cpu_matmul.fits(in_features, out_features, group, 4)


def pack(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, order: torch.Tensor | None, group: int) -> PackedWeight:
    """The kernel's layout (``weight`` uint8 [N/32, K/2, 32]) from codes [K, N] (0..15, rows in the
    kernel's input order), scales and zero points [K/group, N] (``w = scale · (code − zero)``) and the input order (or None)."""
    k, n = codes.shape
    if not fits(k, n, group):
        raise ValueError(f"int4 CPU kernel: [{k}, {n}] in groups of {group} does not fit (needs out % {TILE}, group % 4, in % group)")
    # [K/2, 2 (row of the pair), N/32, 2 (column j or 16 + j), 16] -> [tile, pair, j, row of the pair, half]
    c = codes.to(torch.uint8).view(k // 2, 2, n // TILE, 2, 16).permute(2, 0, 4, 1, 3)
    # in large pages: a decode step streams every layer's codes once (see r1kit.native.huge_empty)
    weight = native.huge_copy((c[..., 0] | (c[..., 1] << 4)).reshape(n // TILE, k // 2, TILE))
    return PackedWeight(weight, scale_zero(scales, zeros), None if order is None else order.to(torch.int64).contiguous(), group, k, n)


class Int4CpuKernel(CpuMatmul):
    """The loaded library; :meth:`__call__` runs ``x @ W (+ bias)`` for a packed int4 weight."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        super().__init__(lib, FUNCTIONS, "int4 CPU kernel", load)
        self.available = bool(lib.int4_matmul_available())


@functools.cache
def load() -> Int4CpuKernel | None:
    """The kernel, built once per process (and once per machine, cached on disk); None where it cannot
    be built or this CPU has no AVX512-BF16."""
    lib = native.load(SOURCE, "int4 layers use torch's kernel")
    kernel = None if lib is None else Int4CpuKernel(lib)
    return kernel if kernel is not None and kernel.available else None
