"""The CUDA Triton kernels (:mod:`r1kit.quant.triton_int4`) as an int4 backend.

They read the GPTQ tensors as stored (act-order included, nothing repacked), so the state is the
stored tensors themselves plus the one fact the kernels can use to read a tile's scales at once: the
group size where ``g_idx`` is contiguous. ``auto`` takes them on CUDA where ``triton`` is installed and
they passed their self-check on that device for that dtype (:func:`~r1kit.quant.triton_int4.verified`);
asked for by name they also run on the CPU under Triton's interpreter, which is how the tests check them.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Callable

import torch

from r1kit.quant import packing

if TYPE_CHECKING:
    from r1kit.quant.int4_linear import QuantLinear

NAME = "triton"


@dataclass(frozen=True)
class TritonState:
    """The stored tensors, the contiguous group size (0 for act-order), the bias and the matmul to call."""

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor
    zero_offset: int
    group_k: int
    bias: torch.Tensor | None
    run: Callable[..., torch.Tensor]


@functools.cache
def installed() -> bool:
    """Whether the ``triton`` package is installed (CUDA builds of torch bring it)."""
    return importlib.util.find_spec("triton") is not None


@functools.cache
def kernels() -> ModuleType:
    """:mod:`r1kit.quant.triton_int4`, imported at first use (importing it needs ``triton``)."""
    return importlib.import_module("r1kit.quant.triton_int4")


def available(layer: QuantLinear, device: torch.device, dtype: torch.dtype) -> str | None:
    if layer.bits != 4:
        return f"the Triton kernels run 4-bit weights, this layer holds {layer.bits}-bit ones"
    if device.type != "cuda":
        return "the Triton int4 kernels run on CUDA (elsewhere only under Triton's interpreter, asked for by name)"
    if not installed():
        return "triton is not installed (pip install triton)"
    if not kernels().verified(device, dtype):
        return f"the Triton int4 kernels failed their self-check on {device} for {dtype}"
    return None


def prepare(layer: QuantLinear) -> TritonState:
    contiguous = packing.groups_contiguous(layer.g_idx, layer.in_features, layer.group_size)
    group_k = packing.group_span(layer.in_features, layer.group_size) if contiguous else 0
    return TritonState(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.zero_offset, group_k, layer.bias,
                       kernels().int4_gptq_matmul)


def matmul(x: torch.Tensor, state: TritonState) -> torch.Tensor:
    out = state.run(x, state.qweight, state.qzeros, state.scales, state.g_idx, state.zero_offset, state.group_k)
    return out if state.bias is None else out + state.bias.to(x.dtype)
