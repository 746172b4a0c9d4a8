"""The GPTQ tensors as the CPU kernels (both int4 ones and the int8 one) take them: codes [in, out]
with the inputs in group order, and one scale and zero point per *kernel group* of inputs.

A kernel group is the largest of :data:`KERNEL_GROUPS` that divides every GPTQ group, so each GPTQ
group is whole kernel groups sharing its scale: 512 is two of 256, and a group size that does not
divide ``in_features`` (GPTQModel's partial last group, ``g_idx[i] = i // g``) runs exactly with no
padding (576 inputs in groups of 128 run as groups of 64, each GPTQ group's scale repeated).
Act-order checkpoints (non-monotonic ``g_idx``) run by sorting the input features by group once; the
kernels gather the activations' columns the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, NamedTuple

import torch

from r1kit.quant import packing

if TYPE_CHECKING:
    from r1kit.quant.int4_linear import QuantLinear

KERNEL_GROUPS = (256, 128, 64, 32)
NOT_CPU = "the CPU int4 kernels run on the CPU"


@dataclass(frozen=True)
class Layout:
    """How the CPU kernels read a layer: its kernel group, and the input order that makes its groups
    contiguous (None where they already are)."""

    group: int
    order: torch.Tensor | None


class KernelInputs(NamedTuple):
    """What the CPU kernels pack: codes [in, out] (0..2^bits − 1, rows in ``order``), scales and zero
    points [in/group, out] in float (``w = scale · (code − zero)``), the input order or None, the kernel group."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    order: torch.Tensor | None
    group: int


def kernel_group(in_features: int, group_size: int) -> int | None:
    """The largest of :data:`KERNEL_GROUPS` that divides every GPTQ group (the partial last one
    too); None where none does."""
    whole = math.gcd(packing.group_span(in_features, group_size), in_features)
    return next((g for g in KERNEL_GROUPS if whole % g == 0), None)


def layout(layer: QuantLinear, device: torch.device) -> Layout | str:
    """The layer's :class:`Layout` for a product on ``device``, or why the CPU kernels cannot read it
    (worked out once per version of its tensors: it reads ``g_idx``)."""
    if device.type != "cpu":
        return NOT_CPU
    return layer.prepared(_layout)


def reason(layer: QuantLinear, device: torch.device, fits: Callable[[int, int, int], str | None], bits: int) -> str | None:
    """Why a CPU kernel of ``bits``-bit codes whose shape rule is ``fits`` cannot run ``layer`` on ``device``, or None."""
    if layer.bits != bits:
        return f"it runs {bits}-bit weights, this layer holds {layer.bits}-bit ones"
    found = layout(layer, device)
    return found if isinstance(found, str) else fits(layer.in_features, layer.out_features, found.group)


def _layout(layer: QuantLinear) -> Layout | str:
    if layer.out_features % 16:
        return f"out_features={layer.out_features} is not a multiple of 16"
    group = kernel_group(layer.in_features, layer.group_size)
    if group is None:
        return f"no kernel group of {KERNEL_GROUPS} divides both group_size={layer.group_size} and in_features={layer.in_features}"
    if packing.groups_contiguous(layer.g_idx, layer.in_features, layer.group_size):
        return Layout(group, None)
    g = layer.g_idx.long()
    # sorted by group, the inputs must fall into the groups of i // group_size
    if not torch.equal(g.sort().values, packing.default_g_idx(layer.in_features, layer.group_size, g.device).long()):
        return "g_idx assigns inputs to groups of other sizes than group_size"
    return Layout(group, torch.argsort(g, stable=True))


def kernel_inputs(layer: QuantLinear) -> KernelInputs:
    """The layer's tensors in its :class:`Layout` (unpacked: the caller packs them and drops these)."""
    found = layout(layer, layer.qweight.device)
    if isinstance(found, str):
        raise ValueError(f"the CPU int4 kernels cannot read {layer.extra_repr()}: {found}")
    codes, zeros = packing.unpack_gptq(layer.qweight, layer.qzeros, layer.bits, layer.zero_offset)  # [in, out], [G, out]
    if found.order is not None:
        codes = codes[found.order]
    # the GPTQ group of each kernel group (of its first input, in the contiguous order)
    owner = packing.default_g_idx(layer.in_features, layer.group_size, layer.scales.device)[:: found.group].long()
    return KernelInputs(codes, layer.scales.float()[owner], zeros.float()[owner], found.order, found.group)
