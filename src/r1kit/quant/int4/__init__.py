"""The ways to compute a :class:`~r1kit.quant.int4_linear.QuantLinear`'s product (4- or 8-bit), one module each.

* :mod:`~r1kit.quant.int4.dequant`: unpack to a float weight and ``F.linear`` (the reference; any
  device, and the only one with a backward);
* :mod:`~r1kit.quant.int4.cpu_kernel`: r1kit's AVX512-BF16 C kernel (:mod:`r1kit.quant.cpu_int4`);
* :mod:`~r1kit.quant.int4.torch_kernel`: torch's ``aten._weight_int4pack_mm_for_cpu``;
* :mod:`~r1kit.quant.int4.triton_kernel`: the CUDA Triton kernels (:mod:`r1kit.quant.triton_int4`).
* :mod:`~r1kit.quant.int4.int8_kernel`: r1kit's int8 CPU kernel (:mod:`r1kit.quant.cpu_int8`), the one
  kernel of 8-bit layers (the others run 4 bits).

Each module is an :class:`Int4Backend`; :mod:`~r1kit.quant.int4.choose` is the one place that
picks among them, and :mod:`~r1kit.quant.int4.cpu_layout` holds what the two CPU kernels share.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from r1kit.quant.int4_linear import QuantLinear


class Int4Backend(Protocol):
    """One way to compute ``x · Wᵀ + bias`` for a GPTQ layer (each backend module is one; the CPU
    kernels' ``BITS`` says which width they run).

    ``prepare`` turns the layer's stored tensors into what ``matmul`` reads (a repacked copy, or
    references to the stored tensors); the layer keeps that state until its tensors change
    (:meth:`~r1kit.quant.int4_linear.QuantLinear.prepared`), so ``matmul`` does no per-call setup.
    """

    NAME: str

    def available(self, layer: QuantLinear, device: torch.device, dtype: torch.dtype) -> str | None:
        """Why this backend cannot run ``layer`` for ``dtype`` activations on ``device``, or None where it can."""

    def prepare(self, layer: QuantLinear) -> Any:
        """The state :func:`matmul` reads, built from the layer's tensors as they are now."""

    def matmul(self, x: torch.Tensor, state: Any) -> torch.Tensor:
        """``x`` [..., in] through the layer ``state`` was prepared from: [..., out] in ``x``'s dtype, bias included."""
