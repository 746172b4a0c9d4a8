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
from dataclasses import dataclass
from pathlib import Path

import torch

from r1kit import native

SOURCE = Path(__file__).parent / "csrc" / "int4_matmul.c"
TILE = 32  # output columns per tile
FUNCTIONS = {torch.float32: "int4_matmul_f32", torch.bfloat16: "int4_matmul_bf16"}
STATUS = {1: "shapes do not fit the layout", 2: "out of memory", 3: "no AVX512-BF16 kernel on this CPU"}


@dataclass(frozen=True)
class PackedInt4:
    """Weights in the kernel's layout: ``weight`` uint8 [N/32, K/2, 32], ``scale_zero`` float16
    [N/32, groups, 2, 32] (32 scales, then 32 zero points, per tile and group), ``order`` the input
    order (int64 [K]) or None, for a [K, N] product in groups of ``group`` inputs."""

    weight: torch.Tensor
    scale_zero: torch.Tensor
    order: torch.Tensor | None
    group: int
    in_features: int
    out_features: int


def fits(in_features: int, out_features: int, group: int) -> bool:
    """Whether a [in, out] product in groups of ``group`` fits the layout."""
    return out_features % TILE == 0 and group % 4 == 0 and in_features % group == 0


def pack(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, order: torch.Tensor | None, group: int) -> PackedInt4:
    """The kernel's layout from codes [K, N] (0..15, rows in the kernel's input order), scales and
    zero points [K/group, N] (``w = scale · (code − zero)``) and the input order (or None)."""
    k, n = codes.shape
    if not fits(k, n, group):
        raise ValueError(f"int4 CPU kernel: [{k}, {n}] in groups of {group} does not fit (needs out % {TILE}, group % 4, in % group)")
    # [K/2, 2 (row of the pair), N/32, 2 (column j or 16 + j), 16] -> [tile, pair, j, row of the pair, half]
    c = codes.to(torch.uint8).view(k // 2, 2, n // TILE, 2, 16).permute(2, 0, 4, 1, 3)
    weight = (c[..., 0] | (c[..., 1] << 4)).contiguous().view(n // TILE, k // 2, TILE)
    groups = k // group
    scale_zero = torch.stack((scales, zeros), dim=1).view(groups, 2, n // TILE, TILE).permute(2, 0, 1, 3).to(torch.float16).contiguous()
    return PackedInt4(weight, scale_zero, None if order is None else order.to(torch.int64).contiguous(), group, k, n)


class Int4CpuKernel:
    """The loaded library; :meth:`__call__` runs ``x @ W (+ bias)`` for a :class:`PackedInt4`."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.available = bool(lib.int4_matmul_available())
        pointer, i64 = ctypes.c_void_p, ctypes.c_int64
        self._fns = {}
        for dtype, name in FUNCTIONS.items():
            fn = getattr(lib, name)
            fn.argtypes = [pointer, i64, i64, i64, pointer, pointer, i64, pointer, pointer, pointer]
            fn.restype = ctypes.c_int
            self._fns[dtype] = fn

    def __reduce__(self):
        # the library is per process: a copy or a pickle of a layer's kernel state loads it again
        return load, ()

    def __call__(self, x: torch.Tensor, packed: PackedInt4, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` [..., K] (float32 or bfloat16, CPU) times the packed weight, plus ``bias``; ``x``'s dtype out."""
        fn = self._fns.get(x.dtype)
        if fn is None or x.device.type != "cpu":
            raise TypeError(f"int4 CPU kernel takes float32 or bfloat16 CPU inputs, got {x.dtype} on {x.device}")
        if x.shape[-1] != packed.in_features:
            raise ValueError(f"int4 CPU kernel: input has {x.shape[-1]} features, the weight {packed.in_features}")
        if not x.is_contiguous():
            x = x.contiguous()
        rows = x.numel() // packed.in_features
        out = torch.empty(*x.shape[:-1], packed.out_features, dtype=x.dtype)
        if rows == 0:
            return out
        if bias is not None:
            if bias.numel() != packed.out_features or bias.device.type != "cpu":
                raise ValueError(f"int4 CPU kernel: bias must be {packed.out_features} values on the CPU, got {tuple(bias.shape)} on {bias.device}")
            bias = bias.to(torch.float32).contiguous()
        status = fn(
            x.data_ptr(), rows, packed.in_features, packed.out_features, packed.weight.data_ptr(), packed.scale_zero.data_ptr(),
            packed.group, 0 if packed.order is None else packed.order.data_ptr(), 0 if bias is None else bias.data_ptr(), out.data_ptr(),
        )
        if status:
            raise RuntimeError(f"int4 CPU kernel failed (status {status}: {STATUS.get(status, 'unknown')})")
        return out


@functools.cache
def load() -> Int4CpuKernel | None:
    """The kernel, built once per process (and once per machine, cached on disk); None where it cannot
    be built or this CPU has no AVX512-BF16."""
    lib = native.load(SOURCE, "int4 layers use torch's kernel")
    kernel = None if lib is None else Int4CpuKernel(lib)
    return kernel if kernel is not None and kernel.available else None
