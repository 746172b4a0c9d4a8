"""``QuantLinear`` (``QuantLinear``): the drop-in replacement for ``nn.Linear`` that holds a GPTQ weight
of 4 bits, or of 8 bits (the q8_0 class: a precision between bfloat16 and int4).

Its state dict is the checkpoint's (``qweight``, ``qzeros``, ``scales``, ``g_idx`` [, ``bias``]), so a
quantized model saves and loads in the GPTQ layout with no renaming. A group size that does not
divide ``in_features`` leaves a partial last group (GPTQModel's layout: ``⌈in/g⌉`` groups,
``g_idx[i] = i // g``); every backend runs it as it is, nothing padded.

The layer holds the tensors and the module interface; the products are computed by the backends of
:mod:`r1kit.quant.int4` (the dequantize reference; for 4 bits r1kit's CPU kernel, torch's CPU kernel
and the CUDA Triton kernels; for 8 bits r1kit's int8 CPU kernel, the reference elsewhere), chosen by
:mod:`r1kit.quant.int4.choose` from the layer's ``backend``. What a backend
prepares from the tensors (a repacked copy for the CPU kernels) lives outside the state dict and
is kept until the tensors change; the module never changes the stored tensors.
:class:`FusedInt4Linear` and :class:`StackedInt4Linear` run several layers over one input as one
product through the same backends.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import torch
from torch import nn

from r1kit.quant import packing
from r1kit.quant.config import LINEAR_BITS
from r1kit.quant.int4 import (
    Int4Backend,
    choose,
    cpu_kernel,
    cpu_layout,
    dequant,
    torch_kernel,
)
from r1kit.quant.int4.choose import BACKENDS
from r1kit.quant.int4.torch_kernel import pack as pack_for_torch_kernel

__all__ = ["BACKENDS", "FusedInt4Linear", "QuantLinear", "QuantLinear", "StackedInt4Linear", "int4_matmul", "pack_for_torch_kernel"]

T = TypeVar("T")
# assigning one of these (not in place) drops what was prepared from the old tensors
TENSORS = frozenset(("qweight", "qzeros", "scales", "g_idx", "bias"))


class QuantLinear(nn.Module):
    """A GPTQ linear of ``bits`` 4 or 8. ``backend``: ``auto`` (a CPU kernel or the Triton one where it
    applies), ``kernel``, ``triton`` (4 bits) or ``dequant`` (see :mod:`r1kit.quant.int4.choose`)."""

    def __init__(self, in_features: int, out_features: int, group_size: int = 128, bias: bool = False,
                 bits: int = 4, zero_offset: int = 1, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if bits not in LINEAR_BITS:
            raise ValueError(f"QuantLinear holds {' or '.join(map(str, LINEAR_BITS))}-bit weights, got bits={bits}")
        if group_size != -1 and group_size < 1:
            raise ValueError(f"group_size={group_size} must be a positive integer, or -1 for one group over all inputs")
        per_word = 32 // bits
        if in_features % per_word:
            raise ValueError(f"in_features={in_features} must be a multiple of {per_word} ({per_word} {bits}-bit codes per int32)")
        if out_features % per_word:
            raise ValueError(f"out_features={out_features} must be a multiple of {per_word} ({per_word} {bits}-bit zero points per int32)")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.zero_offset = bits, group_size, zero_offset
        self._kernel: tuple[tuple, dict] | None = None  # (the tensors' versions, what was prepared from them): see prepared()
        self._frozen: tuple[Callable, Any] | None = None  # (matmul, state) fixed by freeze()
        groups = packing.group_count(in_features, group_size)  # the last one partial where group_size does not divide
        self.register_buffer("qweight", torch.zeros(in_features // per_word, out_features, dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.zeros(groups, out_features // per_word, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16, device=device))
        self.register_buffer("g_idx", packing.default_g_idx(in_features, group_size, device=device or "cpu"))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self.backend = "auto"

    @classmethod
    def from_packed(cls, tensors: dict[str, torch.Tensor], in_features: int, out_features: int, group_size: int,
                    bias: torch.Tensor | None = None, zero_offset: int = 1, dtype: torch.dtype = torch.float32,
                    bits: int = 4) -> QuantLinear:
        layer = cls(in_features, out_features, group_size, bias=bias is not None, bits=bits, zero_offset=zero_offset,
                    dtype=dtype, device=tensors["qweight"].device)
        for name in ("qweight", "qzeros", "scales", "g_idx"):
            getattr(layer, name).copy_(tensors[name])
        if bias is not None:
            layer.bias.copy_(bias)
        return layer

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, group_size={self.group_size}, backend={self.backend}"

    # -- weights ----------------------------------------------------------------------------------
    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight [out, in] that the codes stand for."""
        return packing.dequantize(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, self.zero_offset, dtype)

    def prepared(self, build: Callable[[QuantLinear], T]) -> T:
        """``build(self)`` (a backend's ``prepare``, or another function of the stored tensors alone),
        built at first use and kept until the tensors change: modified in place (their versions),
        replaced, moved or cast."""
        tensors = self._buffers  # not four nn.Module.__getattr__ calls: this runs on every call that is not frozen
        key = (tensors["qweight"]._version, tensors["qzeros"]._version, tensors["scales"]._version, tensors["g_idx"]._version)
        kept = self._kernel
        if kept is None or kept[0] != key:
            kept = self._kernel = (key, {})
        try:
            return kept[1][build]
        except KeyError:
            value = kept[1][build] = build(self)
            return value

    def kernel_applies(self, device: torch.device) -> bool:
        """Whether a CPU kernel runs this layer on ``device``."""
        return choose.cpu_kernel_for(self, device) is not None

    # -- compute ----------------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in BACKENDS:
            raise ValueError(f"QuantLinear.backend must be one of {BACKENDS}, got {value!r}")
        self._backend, self._frozen = value, None

    def freeze(self) -> bool:
        """Inference only: fix the CPU kernel's state now, so that each call skips choosing a backend
        and checking that the stored tensors have not changed. The engine freezes its int4 layers; a
        move, a cast, a replaced tensor or a new ``backend`` unfreezes. Returns whether a kernel applies."""
        device = self.qweight.device
        if self.backend in ("auto", "kernel") and device.type == "cpu":
            backend = choose.cpu_kernel_for(self, device)
            self._frozen = None if backend is None else (backend.matmul, self.prepared(backend.prepare))
        return self._frozen is not None

    def resolved_backend(self, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
        """The backend a forward of ``dtype`` activations on ``device`` uses (``auto`` resolved: on CUDA
        the Triton kernels where ``triton`` is installed and they passed their self-check there)."""
        return choose.resolved(self, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frozen = self._frozen
        if frozen is not None and not (torch.is_grad_enabled() and x.requires_grad):
            return frozen[0](x, frozen[1])
        return self.run(choose.for_forward(self, x), x)

    def run(self, backend: Int4Backend, x: torch.Tensor) -> torch.Tensor:
        """``x`` through ``backend`` (whatever ``self.backend`` says), with its state for the current tensors."""
        return backend.matmul(x, self.prepared(backend.prepare))

    def forward_kernel(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(choose.named(self, "kernel", x.device, x.dtype), x)

    def forward_triton(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(choose.named(self, "triton", x.device, x.dtype), x)

    def forward_dequant(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(dequant, x)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in TENSORS:  # backend states hold the old tensors (or copies of them)
            self.__dict__["_kernel"] = self.__dict__["_frozen"] = None
        super().__setattr__(name, value)

    def _apply(self, fn, recurse=True):
        # A device or dtype move invalidates the backends' states. Scales keep their float16 bits (the
        # checkpoint's) whatever dtype the model is cast to: seen as integers for the cast, a model
        # .to(bfloat16) moves them without rounding them through bfloat16.
        self._kernel = self._frozen = None
        half = self.scales.dtype == torch.float16
        if half:
            self.scales = self.scales.view(torch.int16)
        try:
            super()._apply(fn, recurse)
        finally:
            self.scales = self.scales.view(torch.float16) if half else self.scales.to(torch.float16)
        return self



def int4_matmul(x: torch.Tensor, state: cpu_kernel.CpuKernelState | Any) -> torch.Tensor:
    """``x`` through a CPU int4 kernel's state, either kernel's (:func:`pack_for_torch_kernel`,
    :func:`r1kit.quant.int4.cpu_kernel.pack`); ``x``'s dtype out, the state's bias added."""
    backend = cpu_kernel if isinstance(state, cpu_kernel.CpuKernelState) else torch_kernel
    return backend.matmul(x, state)


class FusedInt4Linear(nn.Module):
    """Several GPTQ linears over the same input (q/k/v, gate/up) as one CPU kernel call (4- or 8-bit,
all parts the same).

    Inference only, built by :func:`r1kit.infer.weight_packing.pack_linears`. It holds only the
    kernel's copy of the concatenated weights: the parts stay where they were, so the state dict
    (the GPTQ checkpoint's tensors) does not change. ``split_sizes`` cuts the output into the parts.
    """

    def __init__(self, parts: list[QuantLinear], backend: Int4Backend, state: Any) -> None:
        super().__init__()
        self._matmul, self.state = backend.matmul, state
        self.split_sizes = [p.out_features for p in parts]
        self.in_features, self.out_features = parts[0].in_features, sum(self.split_sizes)

    @classmethod
    def fuse(cls, parts: list) -> FusedInt4Linear | None:
        """The fused layer, or None where the parts cannot share one kernel call (not all int4 on the
        CPU, act-order permutations, different kernel groups, no CPU kernel for the whole)."""
        if not all(isinstance(p, QuantLinear) and p.backend == "auto" and p.qweight.device.type == "cpu" for p in parts):
            return None
        if len({p.bits for p in parts}) != 1:
            return None
        layouts = [cpu_layout.layout(p, p.qweight.device) for p in parts]
        if any(isinstance(lay, str) or lay.order is not None for lay in layouts) or len({lay.group for lay in layouts}) != 1:
            return None
        group, out_features = layouts[0].group, sum(p.out_features for p in parts)
        backend = choose.cpu_kernel_fitting(parts[0].in_features, out_features, group, parts[0].bits)
        if backend is None:
            return None
        inputs = [cpu_layout.kernel_inputs(p) for p in parts]
        codes, scales, zeros = (torch.cat([i[k] for i in inputs], dim=1) for k in range(3))
        # float32 once here: r1kit's kernels add a float32 bias (a bf16 model's would be cast per call)
        bias = torch.cat([p.bias.float() if p.bias is not None else torch.zeros(p.out_features) for p in parts]) \
            if any(p.bias is not None for p in parts) else None
        return cls(parts, backend, backend.pack(codes, scales, zeros, None, group, bias))

    @property
    def bias(self) -> torch.Tensor | None:
        """The parts' biases concatenated (float32), or None: what ``nn.Linear`` callers read."""
        return self.state.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("FusedInt4Linear is for inference (the engine's); train through the QuantLinear parts")
        return self._matmul(x, self.state)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, split_sizes={self.split_sizes}"


class StackedInt4Linear(QuantLinear):
    """Several int4 linears over the same input stacked along their outputs into one (q/k/v, gate/up),
    for the GPU: one Triton launch instead of several, and a wider product for the small k/v parts.

    GPTQ packs outputs along columns (``qweight`` [in/8, out], ``qzeros`` [groups, out/8], ``scales``
    [groups, out]), so stacking is a concatenation along the last dim; the parts must share their
    inputs' grouping (``g_idx``, group size, zero convention). It replaces the parts (their modules
    become None, as :class:`r1kit.infer.weight_packing.FusedPackedLinear` does) and writes them back
    under their own names on save, so the state dict stays the checkpoint's. ``split_sizes`` cuts the
    output into the parts. Built by :func:`r1kit.infer.weight_packing.pack_linears` on CUDA."""

    @classmethod
    def stack(cls, name: str, parts: dict[str, nn.Module]) -> StackedInt4Linear | None:
        """The stacked layer, or None where the parts cannot share one product (not all int4, different
        input grouping or zero convention, some with a bias and some without)."""
        layers = list(parts.values())
        first = layers[0]
        if not all(type(p) is QuantLinear and p.bits == 4 for p in layers):  # the Triton kernels run 4 bits
            return None
        same = all(
            (p.in_features, p.group_size, p.zero_offset, p.bits, p.scales.dtype, p.bias is None) ==
            (first.in_features, first.group_size, first.zero_offset, first.bits, first.scales.dtype, first.bias is None)
            and torch.equal(p.g_idx, first.g_idx) for p in layers
        )
        if not same:
            return None
        tensors = {key: torch.cat([getattr(p, key) for p in layers], dim=1) for key in ("qweight", "qzeros", "scales")}
        tensors["g_idx"] = first.g_idx
        bias = None if first.bias is None else torch.cat([p.bias for p in layers])
        stacked = cls.from_packed(tensors, first.in_features, sum(p.out_features for p in layers), first.group_size, bias=bias,
                                  zero_offset=first.zero_offset, dtype=first.bias.dtype if bias is not None else torch.float32)
        stacked.backend = first.backend
        stacked.name, stacked.parts, stacked.split_sizes = name, tuple(parts), [p.out_features for p in layers]
        return stacked

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        parent = prefix[: len(prefix) - len(self.name) - 1]
        sizes = self.split_sizes
        pieces = zip(self.qweight.split(sizes, dim=1), self.qzeros.split([n * self.bits // 32 for n in sizes], dim=1), self.scales.split(sizes, dim=1),
                     self.bias.split(sizes) if self.bias is not None else [None] * len(sizes))
        for part, (qweight, qzeros, scales, bias) in zip(self.parts, pieces):
            tensors = {"qweight": qweight, "qzeros": qzeros, "scales": scales, "g_idx": self.g_idx, "bias": bias}
            for key, tensor in tensors.items():
                if tensor is not None:
                    destination[f"{parent}{part}.{key}"] = tensor.clone()
