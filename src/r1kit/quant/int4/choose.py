"""Which backend computes an :class:`~r1kit.quant.int4_linear.Int4Linear`'s product: the one place
that decides.

A layer's ``backend`` is one of :data:`BACKENDS`:

* ``auto``: the first of :data:`AUTO` available for the activations' device and dtype: the Triton
  kernels on CUDA (installed, self-checked), r1kit's CPU kernel, torch's CPU kernel, else the
  dequantize reference;
* ``kernel``: a CPU kernel (r1kit's where it fits, else torch's), an error where neither applies;
* ``triton``: the Triton kernels (any device: the CPU runs them under Triton's interpreter), an
  error without the ``triton`` package;
* ``dequant``: the reference.

The kernels have no backward (their outputs would silently carry no gradient), so a forward that
needs a gradient takes the reference under ``auto`` (training through a quantized model, e.g.
adapters) and raises under an explicit kernel.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from r1kit.quant.int4 import Int4Backend, cpu_kernel, dequant, torch_kernel, triton_kernel

if TYPE_CHECKING:
    from r1kit.quant.int4_linear import Int4Linear

BACKENDS = ("auto", "kernel", "triton", "dequant")
CPU_KERNELS: tuple[Int4Backend, ...] = (cpu_kernel, torch_kernel)
AUTO: tuple[Int4Backend, ...] = (triton_kernel, *CPU_KERNELS, dequant)
CHOICE = {cpu_kernel: "kernel", torch_kernel: "kernel", triton_kernel: "triton", dequant: "dequant"}


def for_forward(layer: Int4Linear, x: torch.Tensor) -> Int4Backend:
    """The backend ``layer``'s forward runs ``x`` through (the gradient rule, then :func:`named`)."""
    if torch.is_grad_enabled() and x.requires_grad:
        if layer.backend in ("kernel", "triton"):
            raise RuntimeError(f"backend={layer.backend!r} has no backward; use backend='auto' or 'dequant' to train through {layer.extra_repr()}")
        return dequant
    return named(layer, layer.backend, x.device, x.dtype)


def named(layer: Int4Linear, choice: str, device: torch.device, dtype: torch.dtype) -> Int4Backend:
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
                f"the CPU int4 kernel does not apply to {layer.extra_repr()} on {device} "
                "(it needs CPU, out_features % 16 == 0, and a group size and in_features that are both multiples of 32); "
                "use backend='dequant'"
            )
        return backend
    if choice == "triton":
        if not triton_kernel.installed():
            raise RuntimeError(f"backend='triton' needs the triton package (pip install triton) for {layer.extra_repr()}")
        return triton_kernel
    return dequant


def resolved(layer: Int4Linear, device: torch.device, dtype: torch.dtype) -> str:
    """The layer's ``backend`` with ``auto`` resolved to the choice it makes here."""
    return layer.backend if layer.backend != "auto" else CHOICE[named(layer, "auto", device, dtype)]


def cpu_kernel_for(layer: Int4Linear, device: torch.device) -> Int4Backend | None:
    """The CPU kernel that runs ``layer`` on ``device`` (r1kit's where it fits, else torch's), or None."""
    return next((b for b in CPU_KERNELS if b.available(layer, device, torch.float32) is None), None)


def cpu_kernel_fitting(in_features: int, out_features: int, group: int) -> Int4Backend | None:
    """The CPU kernel for a product of this shape in groups of ``group`` (inputs already in a
    :class:`~r1kit.quant.int4.cpu_layout.Layout`), or None."""
    return next((b for b in CPU_KERNELS if b.fits(in_features, out_features, group) is None), None)
