"""r1kit's int8 CPU kernel (``csrc/int8_matmul.c``): GPTQ 8-bit weights (q8_0 class) times float
activations, the way llama.cpp multiplies q8_0 by q8_0 at decode.

Each activation row is quantized to int8 in blocks of 32 inputs (one float scale per block) and the
products are integer dot products: with AVX512-VNNI one ``vpdpbusd`` multiplies 64 unsigned weight
codes by 4 broadcast signed activations and adds them into 16 int32 lanes, with no unpacking at all,
so a decode step is bound by the weights' bytes. A dequantize-to-bfloat16 + ``vdpbf16ps`` kernel was
measured against it (docs/quant.md) and was slower. Without VNNI the same integers come from a
portable C loop. Activations are float32 or bfloat16 and the output comes back in their dtype, with
the bias and an act-order input permutation applied inside the one call. :func:`load` builds the
library once and checks it against a PyTorch formula on a small case before any layer uses it; where it
cannot be built or fails that check it returns None and 8-bit layers dequantize instead.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path

import torch

from r1kit import native
from r1kit.quant import cpu_matmul
from r1kit.quant.cpu_matmul import TILE, CpuMatmul, PackedWeight, scale_zero

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "int8_matmul.c"
FUNCTIONS = {torch.float32: "int8_matmul_f32", torch.bfloat16: "int8_matmul_bf16"}
BLOCK = 32  # activation inputs per int8 scale: every weight group is whole blocks
CHECK_RTOL = 2e-2  # the self-check's bound on max |Δ| / max |reference| (activation rounding to int8)


def fits(in_features: int, out_features: int, group: int) -> bool:
    """Whether a [in, out] product in groups of ``group`` fits the layout (groups of whole activation blocks)."""
    return cpu_matmul.fits(in_features, out_features, group, BLOCK)


def pack(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, order: torch.Tensor | None, group: int) -> PackedWeight:
    """The kernel's layout (``weight`` uint8 [N/32, K/4, 32, 4]: four inputs' codes per 32-bit lane) from
    codes [K, N] (0..255, rows in the kernel's input order), scales and zero points [K/group, N]
    (``w = scale · (code − zero)``) and the input order (or None)."""
    k, n = codes.shape
    if not fits(k, n, group):
        raise ValueError(f"int8 CPU kernel: [{k}, {n}] in groups of {group} does not fit (needs out % {TILE}, group % {BLOCK}, in % group)")
    # in large pages: a decode step streams every layer's codes once (see r1kit.native.huge_empty)
    weight = native.huge_copy(codes.to(torch.uint8).view(k // 4, 4, n // TILE, TILE).permute(2, 0, 3, 1))
    return PackedWeight(weight, scale_zero(scales, zeros), None if order is None else order.to(torch.int64).contiguous(), group, k, n)


class Int8CpuKernel(CpuMatmul):
    """The loaded library; :meth:`__call__` runs ``x @ W (+ bias)`` for a packed int8 weight.
    ``vnni``: whether its integer products run on AVX512-VNNI (else the portable loop)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        super().__init__(lib, FUNCTIONS, "int8 CPU kernel", load)
        self.vnni = bool(lib.int8_matmul_vnni())


def self_check(kernel: Int8CpuKernel) -> None:
    """A small act-order layer with a bias, 1 and 5 rows, float32 and bfloat16, against ``x · Wᵀ + b``
    in float64 (PyTorch). Raises where the result is off by more than the activations' rounding."""
    g = torch.Generator().manual_seed(0)
    k, n, group = 128, 64, 64
    codes = torch.randint(0, 256, (k, n), generator=g)
    scales = torch.rand(k // group, n, generator=g) * 0.01 + 0.001
    zeros = torch.randint(1, 257, (k // group, n), generator=g).float()
    order = torch.randperm(k, generator=g)
    bias = torch.randn(n, generator=g)
    weight = torch.empty(k, n, dtype=torch.float64)
    weight[order] = (scales.double().repeat_interleave(group, 0) * (codes.double() - zeros.double().repeat_interleave(group, 0)))
    packed = pack(codes, scales, zeros, order, group)
    for rows in (1, 5):
        for dtype in FUNCTIONS:
            x = torch.randn(rows, k, generator=g).to(dtype)
            want = x.double() @ weight + bias.double()
            error = float((kernel(x, packed, bias).double() - want).abs().max() / want.abs().max())
            if not error <= CHECK_RTOL:
                raise RuntimeError(f"int8 CPU kernel self-check mismatch ({rows} rows, {dtype}): max |Δ| {error:.2e} of max |output|")


@functools.cache
def load() -> Int8CpuKernel | None:
    """The kernel, built once per machine (cached on disk) and checked once per process; None where
    it cannot be built or fails :func:`self_check`."""
    lib = native.load(SOURCE, "8-bit layers dequantize instead")
    if lib is None:
        return None
    kernel = Int8CpuKernel(lib)
    try:
        self_check(kernel)
    except RuntimeError as exc:
        log.warning("%s; 8-bit layers dequantize instead", exc)
        return None
    return kernel
