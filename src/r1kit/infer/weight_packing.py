"""CPU inference: linear weights re-laid-out once into oneDNN's blocked format.

A decode step is a chain of matrix-vector (or skinny matrix) products, bound by how fast the
weights stream from memory. PyTorch's default CPU ``F.linear`` (MKL, plain row-major weights)
reaches about 40% of this machine's read bandwidth on them; the same product over a weight that
oneDNN has reordered for a small batch (``mkldnn._reorder_linear_weight``, the packing
``torch.compile``'s CPU backend applies under ``freezing``) reaches about 80%, and is also faster for
prefill-sized inputs (``benchmarks/bench_engine.py`` measures the effect end to end). A packed call
has a fixed cost of ~13 µs, so small layers (``SMALL_WEIGHT``) also keep their plain weight for
one-row products, where ``F.linear`` is faster.

:func:`pack_linears` swaps a model's ``nn.Linear`` layers for :class:`PackedLinear` in place. The
packed modules are inference-only (no gradients); their ``state_dict`` still holds the plain
weights, so a packed model saves as before. Weights read row by row (the Top-K FFN's gather path)
stay plain; int4 GPTQ layers keep their own kernel, their q/k/v and gate/up fused into one call each.
A fused layer is a module swap: the model's attention (dense FFN) becomes a
:class:`FusedQKVAttention` (:class:`FusedGateUpFFN`), which overrides only the projection method.
The engine packs its own copy of a model, never the caller's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from r1kit.model.attention import Attention
from r1kit.model.ffn import DenseFFN, TopKFFN
from r1kit.model.transformer import specialize

# The batch size the weight layout is tuned for: at 16 the 1-, 8- and 16-row products all run
# within a few percent of their own best layout (measured on AVX-512, see the module docstring).
BATCH_HINT = 16
# A packed call costs ~13 µs whatever the weight's size; for one row and a weight up to this many
# elements, MKL's F.linear on the plain weight is faster (one row: 256×256, 4 µs against 17 µs;
# 768×256, 10 against 19; even at 256×1536, 24 against 25), so such layers keep the plain weight too.
SMALL_WEIGHT = 256 * 1024


def packing_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """oneDNN's packed linear exists for CPU float32 and bfloat16 (fp16 needs AVX512-FP16)."""
    return (
        device.type == "cpu"
        and dtype in (torch.float32, torch.bfloat16)
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


class PackedLinear(nn.Module):
    """``y = x Wᵀ + b`` over a oneDNN-packed ``W`` (inference only)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, batch_hint: int = BATCH_HINT) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        # an opaque tensor (not a buffer): state_dict and .to() must not see it, see _save_to_state_dict
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_hint)
        self.plain = weight.detach() if weight.numel() <= SMALL_WEIGHT else None
        self.bias = None if bias is None else bias.detach().clone()

    @classmethod
    def from_linear(cls, linear: nn.Linear, batch_hint: int = BATCH_HINT) -> PackedLinear:
        return cls(linear.weight, linear.bias, batch_hint)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.dtype:
            raise TypeError(f"PackedLinear holds {self.dtype} weights but got a {x.dtype} input; pack after casting the model")
        if self.plain is not None and x.numel() == self.in_features:  # one row of a small layer: see SMALL_WEIGHT
            return F.linear(x, self.plain, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        # the plain [out, in] weight, so saving a packed model writes the usual checkpoint
        destination[prefix + "weight"] = self.packed.to_dense()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, dtype={self.dtype}"


class FusedPackedLinear(PackedLinear):
    """Several linears over the same input as one packed product (q/k/v, gate/up): one weight read
    in one call instead of several. ``split_sizes`` cuts the output back into the parts; the state
    dict still holds each part under its own name (``…self_attn.q_proj.weight``, …)."""

    def __init__(self, name: str, parts: dict[str, nn.Linear], batch_hint: int = BATCH_HINT) -> None:
        linears = list(parts.values())
        has_bias = [lin.bias is not None for lin in linears]
        if any(has_bias) and not all(has_bias):
            raise ValueError(f"cannot fuse {list(parts)}: some have a bias and some do not")
        weight = torch.cat([lin.weight.detach() for lin in linears])
        bias = torch.cat([lin.bias.detach() for lin in linears]) if all(has_bias) else None
        super().__init__(weight, bias, batch_hint)
        self.name, self.parts = name, tuple(parts)
        self.split_sizes = [lin.out_features for lin in linears]

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        parent = prefix[: len(prefix) - len(self.name) - 1]
        weights = self.packed.to_dense().split(self.split_sizes)
        biases = self.bias.split(self.split_sizes) if self.bias is not None else [None] * len(self.parts)
        for part, weight, bias in zip(self.parts, weights, biases):
            destination[f"{parent}{part}.weight"] = weight.clone()
            if bias is not None:
                destination[f"{parent}{part}.bias"] = bias.clone()


class FusedQKVAttention(Attention):
    """Attention whose q/k/v are one product, ``qkv_proj``: a decode step's projection is one weight
    read, and its output goes to the cache's one-call rotary + store + attend as it is."""

    qkv_proj: nn.Module

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return self.qkv_proj(x), None, None


class FusedGateUpFFN(DenseFFN):
    """A SwiGLU FFN whose gate and up projections are one product, ``gate_up_proj``."""

    gate_up_proj: nn.Module

    def project_gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gate_up_proj(x).chunk(2, dim=-1)


# the layers whose projections fuse: (the model's class, the fused variant, its product, the parts)
FUSIONS = (
    (Attention, FusedQKVAttention, "qkv_proj", ("q_proj", "k_proj", "v_proj")),
    (DenseFFN, FusedGateUpFFN, "gate_up_proj", ("gate_proj", "up_proj")),
)


def _plain(linear) -> bool:
    # a plain Parameter: a tensor-parallel shard (DTensor) keeps its own layout
    return type(linear) is nn.Linear and type(linear.weight) is nn.Parameter and packing_supported(linear.weight.device, linear.weight.dtype)


def _fusion(module: nn.Module, name: str, parts: tuple[str, ...], batch_hint: int) -> tuple[nn.Module, bool] | None:
    """One module computing ``module``'s ``parts`` in one call, and whether it replaces them (False:
    int4 parts stay, holding the checkpoint's tensors); None where they do not fuse."""
    from r1kit.quant.int4_linear import FusedInt4Linear, QuantLinear, StackedInt4Linear

    linears = {part: getattr(module, part) for part in parts}
    if all(_plain(lin) for lin in linears.values()) and len({lin.weight.dtype for lin in linears.values()}) == 1:
        return FusedPackedLinear(name, linears, batch_hint), True
    if all(isinstance(lin, QuantLinear) and lin.qweight.device.type == "cuda" for lin in linears.values()):
        stacked = StackedInt4Linear.stack(name, linears)  # one Triton launch; the state dict stays
        return None if stacked is None else (stacked, True)
    fused = FusedInt4Linear.fuse(list(linears.values()))  # int4 parts keep their buffers: the state dict stays
    return None if fused is None else (fused, False)


def _fused_layer(module: nn.Module, batch_hint: int) -> tuple[nn.Module, int] | None:
    """``module``'s fused variant and how many linears it fused; None where it has none (another
    class, a Top-K FFN whose gather path reads W_up's rows, a GELU FFN, parts that do not fuse)."""
    for base, variant, name, parts in FUSIONS:
        if type(module) is base and (base is not DenseFFN or module.gated):
            fusion = _fusion(module, name, parts, batch_hint)
            if fusion is None:
                return None
            product, replaces = fusion
            fused = specialize(module, variant, **{name: product})
            for part in parts if replaces else ():
                setattr(fused, part, None)
            return fused, len(parts)
    return None


def pack_linears(model: nn.Module, batch_hint: int = BATCH_HINT) -> int:
    """Pack the model's ``nn.Linear`` layers for oneDNN, in place; returns how many linears it packed.

    Attention's q/k/v and a dense SwiGLU FFN's gate/up become one fused product each (float weights
    packed for oneDNN; int4 GPTQ layers as one CPU int4 kernel call, their buffers left in place, or
    on CUDA stacked into one :class:`~r1kit.quant.int4_linear.StackedInt4Linear`), their layers
    swapped for :class:`FusedQKVAttention` / :class:`FusedGateUpFFN`;
    the other plain linears are packed one by one, and the other int4 layers frozen
    (:meth:`~r1kit.quant.int4_linear.QuantLinear.freeze`). Nothing happens where the device or dtype has no
    packed kernel. A tied output head gets its own packed copy; the embedding it shares weights with
    keeps the plain table. A Top-K FFN packs only W_gate (its gather path reads rows of the plain
    W_up and W_down); layers under tensor parallelism are left alone."""
    from r1kit.quant.int4_linear import QuantLinear

    packed = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            fused = _fused_layer(child, batch_hint)
            if fused is not None:
                setattr(parent, name, fused[0])
                packed += fused[1]
    for module in list(model.modules()):
        # the Top-K gather path reads rows of W_up and W_down; W_gate it reads whole, like any linear
        only = ("gate_proj",) if isinstance(module, TopKFFN) else None
        for name, child in list(module.named_children()):
            if _plain(child) and (only is None or name in only):
                setattr(module, name, PackedLinear.from_linear(child, batch_hint))
                packed += 1
            elif isinstance(child, QuantLinear) and child.freeze():
                packed += 1
    return packed
