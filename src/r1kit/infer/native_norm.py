"""RMSNorm in one C call for CPU inference (``csrc/rms_norm.c``, built on first use by :mod:`r1kit.native`).

PyTorch's CPU ``rms_norm`` is a composite of about ten operations; at decode a row is one token, so
their dispatch is the whole cost: ~14 µs a call, 25 calls a step on a 12-layer model, about a
seventh of an int4 decode step (``benchmarks/bench_quant.py``). :func:`use_native_norms` swaps a
model's :class:`~r1kit.model.transformer.RMSNorm` layers for :class:`NativeRMSNorm` in place (the
engine does, on its own copy of the model, with its weight packing); the weights stay the same
parameters under the same names.
Where nothing can be built, the model keeps PyTorch's. Results match PyTorch's to within a float32
rounding step (the compiler's fast reciprocal square root and its order of the sum of squares), and
bfloat16 ones to within a bfloat16 step.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
from torch import nn

from r1kit import native
from r1kit.model.transformer import RMSNorm

SOURCE = Path(__file__).parent / "csrc" / "rms_norm.c"
FUNCTIONS = {torch.float32: "rms_norm_f32", torch.bfloat16: "rms_norm_bf16"}


class RMSNormKernel:
    """The loaded library: :meth:`__call__` normalises the rows of a contiguous CPU tensor."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._fns = {}
        for dtype, name in FUNCTIONS.items():
            fn = getattr(lib, name)
            fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_int64, ctypes.c_float]
            fn.restype = None
            self._fns[dtype] = fn

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """``x`` [..., D] and ``weight`` [D], both float32 or both bfloat16, on the CPU."""
        fn = self._fns.get(x.dtype)
        if fn is None or x.dtype != weight.dtype or not (x.is_cpu and weight.is_cpu) or weight.shape != x.shape[-1:]:
            raise ValueError(f"native rms_norm: x {x.dtype} {tuple(x.shape)} on {x.device} and weight {weight.dtype} {tuple(weight.shape)} "
                             "must be float32 or bfloat16 CPU tensors of one dtype, the weight one value per feature")
        x, weight = x.contiguous(), weight.contiguous()
        out = torch.empty_like(x)
        fn(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // x.shape[-1], x.shape[-1], eps)
        return out


@functools.cache
def load() -> RMSNormKernel | None:
    """The kernel, built once per process (and once per machine, cached on disk); None where it cannot be built."""
    lib = native.load(SOURCE, "PyTorch's rms_norm is used")
    return None if lib is None else RMSNormKernel(lib)


class NativeRMSNorm(RMSNorm):
    """:class:`~r1kit.model.transformer.RMSNorm` through the C kernel for inference on the CPU;
    anything else (a gradient to keep, another device or dtype) goes PyTorch's way. Built by
    :func:`use_native_norms`, which has checked that the kernel loads."""

    def __init__(self, norm: RMSNorm) -> None:
        super().__init__(norm.weight.shape[0], norm.eps)
        self.weight = norm.weight
        self.train(norm.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # checked in this order because a decode step calls this 25 times: each test costs
        if x.dtype is self.weight.dtype and x.is_cpu and x.dtype in FUNCTIONS and not (
            torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        ):
            return load()(x, self.weight, self.eps)
        return super().forward(x)


def use_native_norms(model: nn.Module) -> int:
    """Swap ``model``'s CPU RMSNorm layers for :class:`NativeRMSNorm` in place; how many it swapped
    (none where the kernel cannot be built)."""
    targets = [(module, name, child) for module in model.modules() for name, child in module.named_children()
               if type(child) is RMSNorm and child.weight.device.type == "cpu"]
    if not targets or load() is None:  # a GPU model never builds the CPU kernel
        return 0
    for module, name, child in targets:
        setattr(module, name, NativeRMSNorm(child))
    return len(targets)
