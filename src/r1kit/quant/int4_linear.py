"""``Int4Linear``: the drop-in replacement for ``nn.Linear`` that holds a GPTQ 4-bit weight.

Its state dict is the checkpoint's (``qweight``, ``qzeros``, ``scales``, ``g_idx`` [, ``bias``]), so a
quantized model saves and loads in the GPTQ layout with no renaming. Two ways to compute:

* ``kernel`` (CPU): at first use the GPTQ codes are repacked once for a CPU int4 kernel: r1kit's own
  (:mod:`r1kit.quant.cpu_int4`, AVX512-BF16 dot products; float32 or bfloat16 activations in and out,
  bias and act-order permutation inside the one call) where this CPU has AVX512-BF16 and the output
  is a multiple of 32, else torch's ``aten._weight_int4pack_mm_for_cpu`` (``_convert_weight_to_int4pack_for_cpu``
  on [out, in] codes, scales and zeros as [in/g, out, 2] in the float domain, where the kernel
  computes ``w = (q − 8)·scale + zero``; GPTQ's ``scale·(q − z)`` is that with ``zero = (8 − z)·scale``;
  bfloat16 activations, so inputs are cast to bf16 and outputs back; act-order checkpoints
  (non-monotonic ``g_idx``) by sorting the input features by group once and gathering the
  activations' columns the same way).
* ``triton`` (CUDA): :mod:`r1kit.quant.triton_int4`, Triton kernels that read the GPTQ tensors as
  stored (act-order included): unpacked tile by tile inside the matmul for up to 16 rows,
  dequantized once per call for cuBLAS above that. Used on CUDA when ``triton`` is
  installed; on the CPU it runs only under Triton's interpreter, which is how the tests check it.
* ``dequant``: unpack to a float weight and ``F.linear`` (the reference; used wherever neither kernel
  applies: the CPU kernel needs out_features % 16 and kernel groups of 32/64/128/256, the GPU one triton).

A group size that does not divide ``in_features`` leaves a partial last group (GPTQModel's layout:
``⌈in/g⌉`` groups, ``g_idx[i] = i // g``). The CPU kernels run it exactly with a kernel group that
divides both the group size and ``in_features`` (576 inputs in groups of 128 run as groups of 64,
each GPTQ group's scale repeated), so nothing is padded; the Triton kernels read ``g_idx`` and mask
the tile past the last input, so a partial group needs nothing of them.

The module never changes the stored tensors; the kernel's copies live outside the state dict.
"""

from __future__ import annotations

import functools
import importlib.util
import math

import torch
import torch.nn.functional as F
from torch import nn

from r1kit.quant import cpu_int4, packing

KERNEL_GROUPS = (256, 128, 64, 32)
BACKENDS = ("auto", "kernel", "triton", "dequant")


def torch_kernel_available() -> bool:
    """Whether this torch has its own int4 CPU kernel (torch >= 2.6)."""
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


class Int4Linear(nn.Module):
    """A 4-bit GPTQ linear. ``backend``: ``auto`` (the CPU kernel or the Triton one where it applies),
    ``kernel``, ``triton`` or ``dequant``."""

    def __init__(self, in_features: int, out_features: int, group_size: int = 128, bias: bool = False,
                 bits: int = 4, zero_offset: int = 1, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if bits != 4:
            raise ValueError(f"Int4Linear holds 4-bit weights, got bits={bits}")
        if group_size != -1 and group_size < 1:
            raise ValueError(f"group_size={group_size} must be a positive integer, or -1 for one group over all inputs")
        if in_features % 8:
            raise ValueError(f"in_features={in_features} must be a multiple of 8 (8 codes per int32)")
        if out_features % 8:
            raise ValueError(f"out_features={out_features} must be a multiple of 8 (8 zero points per int32)")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.zero_offset = bits, group_size, zero_offset
        groups = packing.group_count(in_features, group_size)  # the last one partial where group_size does not divide
        self.register_buffer("qweight", torch.zeros(in_features // 8, out_features, dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.zeros(groups, out_features // 8, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16, device=device))
        self.register_buffer("g_idx", packing.default_g_idx(in_features, group_size, device=device or "cpu"))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self._kernel: tuple | None = None  # (device and weights version, CPU kernel state or None)
        self._frozen = None  # the CPU kernel state fixed by freeze()
        self._groups: tuple | None = None  # (g_idx device and version, contiguous group size or 0)
        self.backend = "auto"

    @classmethod
    def from_packed(cls, tensors: dict[str, torch.Tensor], in_features: int, out_features: int, group_size: int,
                    bias: torch.Tensor | None = None, zero_offset: int = 1, dtype: torch.dtype = torch.float32) -> Int4Linear:
        layer = cls(in_features, out_features, group_size, bias=bias is not None, zero_offset=zero_offset,
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
        """The float weight [out, in] that the int4 codes stand for."""
        return packing.dequantize(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, self.zero_offset, dtype)

    def kernel_applies(self, device: torch.device) -> bool:
        return self._kernel_state(device) is not None

    def _kernel_group(self) -> int | None:
        """The kernels' group: the largest of :data:`KERNEL_GROUPS` that divides every GPTQ group, so
        each GPTQ group is whole kernel groups sharing its scale (512 is two of 256; a partial last
        group of 64 after groups of 128 makes it 64). None where none divides."""
        whole = math.gcd(packing.group_span(self.in_features, self.group_size), self.in_features)
        return next((g for g in KERNEL_GROUPS if whole % g == 0), None)

    def _group_order(self) -> torch.Tensor | None:
        """Input order that makes groups contiguous: empty when already so, None when group sizes forbid it
        (sorted by group, the inputs must fall into the groups of ``i // group_size``)."""
        if self._groups_contiguous():
            return torch.arange(0)
        g = self.g_idx.long()
        if not torch.equal(g.sort().values, packing.default_g_idx(self.in_features, self.group_size, g.device).long()):
            return None
        return torch.argsort(g, stable=True)

    def _contiguous_group(self) -> int:
        """The group size when ``g_idx`` is ``k // group`` (no act-order), else 0; checked once per
        ``g_idx`` version and device (the check reads the GPU)."""
        key = (self.g_idx.device, self.g_idx._version)
        if self._groups is None or self._groups[0] != key:
            self._groups = (key, packing.group_span(self.in_features, self.group_size) if self._groups_contiguous() else 0)
        return self._groups[1]

    def _groups_contiguous(self) -> bool:
        size = packing.group_span(self.in_features, self.group_size)
        return bool((self.g_idx.long() == torch.arange(self.in_features, device=self.g_idx.device) // size).all())

    def _kernel_state(self, device: torch.device):
        """The CPU kernel's state (see :func:`pack_for_kernel`), built once per device and weights version; None where the kernel does not apply (not CPU, out_features % 16, group sizes)."""
        key = (device, self.qweight._version, self.qzeros._version, self.scales._version, self.g_idx._version)
        if self._kernel is not None and self._kernel[0] == key:
            return self._kernel[1]
        self._kernel = (key, self._build_kernel_state(device))
        return self._kernel[1]

    def _build_kernel_state(self, device: torch.device):
        if device.type != "cpu":
            return None
        inputs = self.kernel_inputs()
        return None if inputs is None else pack_for_kernel(*inputs)

    def kernel_inputs(self) -> tuple | None:
        """(codes [in, out] in kernel input order, scales and zeros [in/kgroup, out] in float, input
        order or None, kernel group), or None where the kernel's shape rules fail."""
        kgroup = self._kernel_group()
        if self.out_features % 16 or kgroup is None:
            return None
        order = self._group_order()
        if order is None:
            return None
        codes, zeros = packing.unpack_gptq(self.qweight, self.qzeros, self.bits, self.zero_offset)  # [in, out], [G, out]
        if order.numel():
            codes = codes[order]
        # the GPTQ group of each kernel group (of its first input, in the contiguous order)
        owner = packing.default_g_idx(self.in_features, self.group_size, self.scales.device)[::kgroup].long()
        return codes, self.scales.float()[owner], zeros.float()[owner], order if order.numel() else None, kgroup

    # -- compute ----------------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in BACKENDS:
            raise ValueError(f"Int4Linear.backend must be one of {BACKENDS}, got {value!r}")
        self._backend, self._frozen = value, None

    def freeze(self) -> bool:
        """Inference only: fix the CPU kernel's state now, so that each call skips the check that the
        stored tensors have not changed (~6 µs of a ~24 µs call at decode). The engine freezes its
        int4 layers; a move, a cast or a new ``backend`` unfreezes. Returns whether the kernel applies."""
        if self.backend in ("auto", "kernel") and self.qweight.device.type == "cpu":
            self._frozen = self._kernel_state(self.qweight.device)
        return self._frozen is not None

    def resolved_backend(self, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
        """The backend a forward of ``dtype`` activations on ``device`` uses (``auto`` resolved: on CUDA
        the Triton kernels where ``triton`` is installed and they passed their self-check there)."""
        if self.backend != "auto":
            return self.backend
        if device.type == "cuda" and triton_available():
            from r1kit.quant.triton_int4 import verified

            if verified(device, dtype):
                return "triton"
        return "kernel" if self.kernel_applies(device) else "dequant"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            # the kernels have no backward (their outputs would silently carry no gradient): the
            # dequantize path's F.linear does, for training through a quantized model (e.g. adapters)
            if self.backend in ("kernel", "triton"):
                raise RuntimeError(f"backend={self.backend!r} has no backward; use backend='auto' or 'dequant' to train through {self.extra_repr()}")
            return self.forward_dequant(x)
        if self._frozen is not None:
            return int4_matmul(x, self._frozen, self.out_features, self.bias)
        backend = self.resolved_backend(x.device, x.dtype)
        if backend == "kernel":
            return self.forward_kernel(x)
        if backend == "triton":
            return self.forward_triton(x)
        return self.forward_dequant(x)

    def forward_triton(self, x: torch.Tensor) -> torch.Tensor:
        if not triton_available():
            raise RuntimeError(f"backend='triton' needs the triton package (pip install triton) for {self.extra_repr()}")
        from r1kit.quant.triton_int4 import int4_gptq_matmul

        out = int4_gptq_matmul(x, self.qweight, self.qzeros, self.scales, self.g_idx, self.zero_offset, self._contiguous_group())
        return out if self.bias is None else out + self.bias.to(x.dtype)

    def forward_dequant(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def forward_kernel(self, x: torch.Tensor) -> torch.Tensor:
        state = self._kernel_state(x.device)
        if state is None:
            raise RuntimeError(
                f"the CPU int4 kernel does not apply to {self.extra_repr()} on {x.device} "
                "(it needs CPU, out_features % 16 == 0, and a group size and in_features that are both multiples of 32); "
                "use backend='dequant'"
            )
        return int4_matmul(x, state, self.out_features, self.bias)

    def _apply(self, fn, recurse=True):
        # A device or dtype move invalidates the kernel's copies. Scales keep their float16 bits (the
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



def pack_for_kernel(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, order: torch.Tensor | None, kgroup: int):
    """The CPU kernel's state from :meth:`Int4Linear.kernel_inputs`: r1kit's own kernel's layout
    (:class:`~r1kit.quant.cpu_int4.PackedInt4`) where it is built for this CPU and the shape fits,
    else torch's (packed weight, scales-and-zeros, order, group); None where neither kernel is had."""
    native = cpu_int4.load()
    if native is not None and cpu_int4.fits(*codes.shape, kgroup):
        return cpu_int4.pack(codes, scales, zeros, order, kgroup)
    return pack_for_torch_kernel(codes, scales, zeros, order, kgroup) if torch_kernel_available() else None


def pack_for_torch_kernel(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, order: torch.Tensor | None, kgroup: int) -> tuple:
    """torch's int4 kernel's state (packed weight, scales-and-zeros, order, group) from the same inputs."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.t().contiguous().to(torch.int32), 1)
    scale_zero = torch.stack((scales, (8 - zeros) * scales), dim=-1).to(torch.bfloat16).contiguous()
    return packed, scale_zero, order, kgroup


def int4_matmul(x: torch.Tensor, state, out_features: int, bias: torch.Tensor | None) -> torch.Tensor:
    """``x`` through the CPU int4 kernel of ``state`` (see :func:`pack_for_kernel`); ``x``'s dtype out."""
    if isinstance(state, cpu_int4.PackedInt4):
        if x.dtype in cpu_int4.FUNCTIONS:
            return cpu_int4.load()(x, state, bias)
        return cpu_int4.load()(x.float(), state, bias).to(x.dtype)
    packed, scale_zero, order, kgroup = state
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if order is not None:
        x2 = x2.index_select(1, order)
    # torch's kernel takes bfloat16 activations (its float32 path is a slow fallback)
    if x2.dtype != torch.bfloat16:
        x2 = x2.to(torch.bfloat16)
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(x2 if x2.is_contiguous() else x2.contiguous(), packed, kgroup, scale_zero)
    if x.dtype != torch.bfloat16:
        out = out.to(x.dtype)
    out = out.view(*shape[:-1], out_features)
    return out if bias is None else out + bias.to(x.dtype)


class FusedInt4Linear(nn.Module):
    """Several int4 linears over the same input (q/k/v, gate/up) as one CPU int4 kernel call.

    Inference only, built by :func:`r1kit.infer.weight_packing.pack_linears`. It holds only the
    kernel's copy of the concatenated weights: the parts stay where they were, so the state dict
    (the GPTQ checkpoint's tensors) does not change. ``split_sizes`` cuts the output into the parts.
    """

    def __init__(self, parts: list[Int4Linear], state) -> None:
        super().__init__()
        self.state = state
        has_bias = [p.bias is not None for p in parts]
        # float32 once here: the native kernel adds a float32 bias (a bf16 model's would be cast per call)
        self.bias = torch.cat([p.bias.float() if p.bias is not None else torch.zeros(p.out_features) for p in parts]) if any(has_bias) else None
        self.split_sizes = [p.out_features for p in parts]
        self.in_features, self.out_features = parts[0].in_features, sum(self.split_sizes)

    @classmethod
    def fuse(cls, parts: list) -> FusedInt4Linear | None:
        """The fused layer, or None where the parts cannot share one kernel call (not all int4 on the
        CPU, act-order permutations, different kernel groups, no CPU kernel for the whole)."""
        if not all(isinstance(p, Int4Linear) and p.backend == "auto" and p.qweight.device.type == "cpu" for p in parts):
            return None
        inputs = [p.kernel_inputs() for p in parts]
        if any(i is None or i[3] is not None for i in inputs) or len({i[4] for i in inputs}) != 1:
            return None
        codes, scales, zeros = (torch.cat([i[k] for i in inputs], dim=1) for k in range(3))
        state = pack_for_kernel(codes, scales, zeros, None, inputs[0][4])
        return None if state is None else cls(parts, state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("FusedInt4Linear is for inference (the engine's); train through the Int4Linear parts")
        return int4_matmul(x, self.state, self.out_features, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, split_sizes={self.split_sizes}"


class StackedInt4Linear(Int4Linear):
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
        if not all(type(p) is Int4Linear for p in layers):
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
        pieces = zip(self.qweight.split(sizes, dim=1), self.qzeros.split([n // 8 for n in sizes], dim=1), self.scales.split(sizes, dim=1),
                     self.bias.split(sizes) if self.bias is not None else [None] * len(sizes))
        for part, (qweight, qzeros, scales, bias) in zip(self.parts, pieces):
            tensors = {"qweight": qweight, "qzeros": qzeros, "scales": scales, "g_idx": self.g_idx, "bias": bias}
            for key, tensor in tensors.items():
                if tensor is not None:
                    destination[f"{parent}{part}.{key}"] = tensor.clone()
