"""What r1kit's CPU kernels for GPTQ weights share: the packed weight's record, the per-tile scales and
zero points, the shape rule, and the ctypes call (with its checks) into a kernel library.

Both kernels (``csrc/int4_matmul.c``: 4-bit codes, AVX512-BF16; ``csrc/int8_matmul.c``: 8-bit codes,
AVX512-VNNI) compute ``y = x · W (+ bias)`` for float32 or bfloat16 ``x`` in tiles of :data:`TILE`
output columns, with ``W = scale · (code − zero)`` per group of inputs and an optional input order
(act-order checkpoints). Only the code layout differs (:mod:`r1kit.quant.cpu_int4`,
:mod:`r1kit.quant.cpu_int8`). This module never decides which kernel runs a layer.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

TILE = 32  # output columns per tile
STATUS = {1: "shapes do not fit the layout", 2: "out of memory", 3: "no kernel for this CPU"}


@dataclass(frozen=True)
class PackedWeight:
    """Weights in a kernel's layout: ``weight`` (the codes, uint8, tile by tile), ``scale_zero`` float16
    [N/32, groups, 2, 32] (32 scales, then 32 zero points, per tile and group), ``order`` the input
    order (int64 [K]) or None, for a [K, N] product in groups of ``group`` inputs."""

    weight: torch.Tensor
    scale_zero: torch.Tensor
    order: torch.Tensor | None
    group: int
    in_features: int
    out_features: int


def fits(in_features: int, out_features: int, group: int, step: int) -> bool:
    """Whether a [in, out] product in groups of ``group`` fits a kernel whose groups are whole ``step``s."""
    return out_features % TILE == 0 and group % step == 0 and in_features % group == 0


def scale_zero(scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """Scales and zero points [K/group, N] (float) as the kernels read them: float16 [N/32, groups, 2, 32]."""
    groups, n = scales.shape
    return torch.stack((scales, zeros), dim=1).view(groups, 2, n // TILE, TILE).permute(2, 0, 1, 3).to(torch.float16).contiguous()


class CpuMatmul:
    """A loaded kernel library; :meth:`__call__` runs ``x @ W (+ bias)`` for a :class:`PackedWeight`.
    ``functions`` names its entry point for each activation dtype; ``label`` names it in errors."""

    def __init__(self, lib: ctypes.CDLL, functions: Mapping[torch.dtype, str], label: str, loader: Callable[[], CpuMatmul | None]) -> None:
        self.label, self._loader = label, loader
        pointer, i64 = ctypes.c_void_p, ctypes.c_int64
        self._fns = {}
        for dtype, name in functions.items():
            fn = getattr(lib, name)
            fn.argtypes = [pointer, i64, i64, i64, pointer, pointer, i64, pointer, pointer, pointer]
            fn.restype = ctypes.c_int
            self._fns[dtype] = fn

    def __reduce__(self):
        # the library is per process: a copy or a pickle of a layer's kernel state loads it again
        return self._loader, ()

    def __call__(self, x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` [..., K] (float32 or bfloat16, CPU) times the packed weight, plus ``bias``; ``x``'s dtype out."""
        fn = self._fns.get(x.dtype)
        if fn is None or x.device.type != "cpu":
            raise TypeError(f"{self.label} takes float32 or bfloat16 CPU inputs, got {x.dtype} on {x.device}")
        if x.shape[-1] != packed.in_features:
            raise ValueError(f"{self.label}: input has {x.shape[-1]} features, the weight {packed.in_features}")
        if not x.is_contiguous():
            x = x.contiguous()
        rows = x.numel() // packed.in_features
        out = torch.empty(*x.shape[:-1], packed.out_features, dtype=x.dtype)
        if rows == 0:
            return out
        if bias is not None:
            if bias.numel() != packed.out_features or bias.device.type != "cpu":
                raise ValueError(f"{self.label}: bias must be {packed.out_features} values on the CPU, got {tuple(bias.shape)} on {bias.device}")
            bias = bias.to(torch.float32).contiguous()
        status = fn(
            x.data_ptr(), rows, packed.in_features, packed.out_features, packed.weight.data_ptr(), packed.scale_zero.data_ptr(),
            packed.group, 0 if packed.order is None else packed.order.data_ptr(), 0 if bias is None else bias.data_ptr(), out.data_ptr(),
        )
        if status:
            raise RuntimeError(f"{self.label} failed (status {status}: {STATUS.get(status, 'unknown')})")
        return out
