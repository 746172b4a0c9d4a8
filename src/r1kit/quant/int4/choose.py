"""Which backend computes an :class:`~r1kit.quant.int4_linear.QuantLinear`'s product: the one place
that decides.

A layer's ``backend`` is one of :data:`BACKENDS`:

* ``auto``: the first of :data:`AUTO` available for the layer's bits and the activations' device
  and dtype: the Triton kernels on CUDA (4 bits; installed, self-checked), r1kit's CPU kernels (int8
  for 8 bits, int4 for 4), torch's int4 CPU kernel, else the dequantize reference;
* ``kernel``: a CPU kernel (r1kit's where it fits, else torch's for 4 bits), an error where none applies;
* ``triton``: the Triton kernels (4 bits; any device: the CPU runs them under Triton's interpreter), an
  error without the ``triton`` package;
* ``dequant``: the reference.

The kernels have no backward (their outputs would silently carry no gradient), so a forward that
needs a gradient takes the reference under ``auto`` (training through a quantized model, e.g.
adapters) and raises under an explicit kernel.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from r1kit.quant.int4 import (
    Int4Backend,
    cpu_kernel,
    dequant,
    int8_kernel,
    torch_kernel,
    triton_kernel,
)

if TYPE_CHECKING:
    from r1kit.quant.int4_linear import QuantLinear

BACKENDS = ("auto", "kernel", "triton", "dequant")
CPU_KERNELS: tuple[Int4Backend, ...] = (int8_kernel, cpu_kernel, torch_kernel)  # each runs one width (its BITS)
AUTO: tuple[Int4Backend, ...] = (triton_kernel, *CPU_KERNELS, dequant)
CHOICE = {int8_kernel: "kernel", cpu_kernel: "kernel", torch_kernel: "kernel", triton_kernel: "triton", dequant: "dequant"}


def for_forward(layer: QuantLinear, x: torch.Tensor) -> Int4Backend:
    """The backend ``layer``'s forward runs ``x`` through (the gradient rule, then :func:`named`)."""
    if torch.is_grad_enabled() and x.requires_grad:
        if layer.backend in ("kernel", "triton"):
            raise RuntimeError(f"backend={layer.backend!r} has no backward; use backend='auto' or 'dequant' to train through {layer.extra_repr()}")
        return dequant
    return named(layer, layer.backend, x.device, x.dtype)


def named(layer: QuantLinear, choice: str, device: torch.device, dtype: torch.dtype) -> Int4Backend:
    """The backend ``choice`` (one of :data:`BACKENDS`) means for ``layer`` and ``dtype`` activations on
    ``device``; raises where an explicit kernel cannot run."""
    if choice == "auto":
        for backend in AUTO:
            if backend.available(layer, device, dtype) is None:
                return backend
    if choice == "kernel":
        backend = cpu_kernel_for(layer, device)
        if backend is None:
            raise RuntimeError(
                f"the CPU kernel does not apply to {layer.extra_repr()} on {device} "
                "(they need the CPU, out_features % 16 == 0 (int8: % 32), and a group size and in_features that are both "
                "multiples of 32); use backend='dequant'"
            )
        return backend
    if choice == "triton":
        if layer.bits != 4:
            raise RuntimeError(f"backend='triton' runs 4-bit weights; {layer.extra_repr()} holds {layer.bits}-bit ones (use 'auto')")
        if not triton_kernel.installed():
            raise RuntimeError(f"backend='triton' needs the triton package (pip install triton) for {layer.extra_repr()}")
        return triton_kernel
    return dequant


def resolved(layer: QuantLinear, device: torch.device, dtype: torch.dtype) -> str:
    """The layer's ``backend`` with ``auto`` resolved to the choice it makes here."""
    return layer.backend if layer.backend != "auto" else CHOICE[named(layer, "auto", device, dtype)]


def cpu_kernel_for(layer: QuantLinear, device: torch.device) -> Int4Backend | None:
    """The CPU kernel that runs ``layer`` on ``device`` (r1kit's where it fits, else torch's), or None."""
    return next((b for b in CPU_KERNELS if b.available(layer, device, torch.float32) is None), None)


def cpu_kernel_fitting(in_features: int, out_features: int, group: int, bits: int) -> Int4Backend | None:
    """The CPU kernel for a product of ``bits``-bit codes of this shape in groups of ``group`` (inputs
    already in a :class:`~r1kit.quant.int4.cpu_layout.Layout`), or None."""
    return next((b for b in CPU_KERNELS if b.BITS == bits and b.fits(in_features, out_features, group) is None), None)
