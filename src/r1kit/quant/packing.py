"""Bit packing of quantized weights in the GPTQ v1 checkpoint layout (AutoGPTQ/GPTQModel/vLLM read it).

For a linear with ``in`` input and ``out`` output features, ``bits`` per code and ``G = ⌈in / group size⌉``
groups (where the group size does not divide ``in``, the last group holds the remainder, as GPTQModel
writes it):

* ``qweight`` int32 [in·bits/32, out]: word ``(r, n)`` holds the codes of input features
  ``r·p … r·p+p−1`` (``p = 32/bits``) of output ``n``; feature ``r·p+j`` sits in bits
  ``j·bits … j·bits+bits−1`` (the first feature in the least significant bits).
* ``qzeros`` int32 [G, out·bits/32]: word ``(g, c)`` holds the zero points of outputs
  ``c·p … c·p+p−1`` of group ``g`` in the same LSB-first order. The v1 convention stores
  ``zero − 1`` (symmetric 4-bit: zero 8 is stored as 7, words read 0x77777777).
* ``scales`` fp16 [G, out]; ``g_idx`` int32 [in]: the group of each input feature.
* Dequantized weight (``[in, out]``, the transpose of ``nn.Linear.weight``):
  ``W[i, n] = scales[g_idx[i], n] · (q[i, n] − zero[g_idx[i], n])``.

This module only moves bits: it must never round, choose scales or touch a model.
"""

from __future__ import annotations

import sys

import torch

from r1kit.errors import CheckpointError

PACKABLE_BITS = (2, 4, 8)


def _per_word(bits: int) -> int:
    if bits not in PACKABLE_BITS:
        raise CheckpointError(f"bits={bits} cannot be packed: r1kit packs {PACKABLE_BITS}-bit codes (3-bit straddles words)")
    return 32 // bits


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words in [0, 2^32) reinterpreted as two's-complement int32 (the top code sets the sign bit)."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[rows, cols] integer codes in [0, 2^bits) → int32 [rows·bits/32, cols] (``qweight``)."""
    p = _per_word(bits)
    rows, cols = codes.shape
    if rows % p:
        raise CheckpointError(f"cannot pack {rows} rows of {bits}-bit codes: the row count must be a multiple of {p}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] to pack into {bits} bits")
    if bits == 8 and sys.byteorder == "little":
        # whole bytes: word (r, n)'s bytes in memory are rows 4r..4r+3 of column n, least significant first
        return codes.to(torch.uint8).reshape(rows // p, p, cols).transpose(1, 2).reshape(rows // p, cols * p).view(torch.int32)
    c = codes.to(torch.int64)
    shifts = (torch.arange(p, device=c.device, dtype=torch.int64) * bits).view(1, p, 1)
    return _to_int32((c.view(rows // p, p, cols) << shifts).sum(dim=1))


def unpack_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [rows·bits/32, cols] → int32 codes [rows, cols]; the inverse of :func:`pack_rows`."""
    p = _per_word(bits)
    shifts = (torch.arange(p, device=words.device, dtype=torch.int32) * bits).view(1, p, 1)
    codes = (words.to(torch.int32).unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(words.shape[0] * p, words.shape[1])


def pack_cols(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[rows, cols] codes → int32 [rows, cols·bits/32] (``qzeros``: neighbouring outputs share a word)."""
    return pack_rows(codes.t(), bits).t().contiguous()


def unpack_cols(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [rows, cols·bits/32] → int32 codes [rows, cols]; the inverse of :func:`pack_cols`."""
    return unpack_rows(words.t(), bits).t().contiguous()


def pack_gptq(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, bits: int,
              zero_offset: int = 1) -> dict[str, torch.Tensor]:
    """The four GPTQ tensors of one linear.

    ``codes`` [out, in] as ``nn.Linear.weight`` is laid out, ``zeros`` and ``scales`` [G, out], ``g_idx`` [in].
    ``zero_offset`` is what the format subtracts from each zero: 1 for v1 (``checkpoint_format: gptq``),
    0 for v2. A v1 zero must lie in [1, 2^bits] so that ``zero − 1`` fits the field.
    """
    stored = zeros.to(torch.int64) - zero_offset
    if stored.numel() and (int(stored.min()) < 0 or int(stored.max()) >= 1 << bits):
        raise ValueError(f"zero points must lie in [{zero_offset}, {(1 << bits) - 1 + zero_offset}] for this format")
    return {
        "qweight": pack_rows(codes.t(), bits),
        "qzeros": pack_cols(stored, bits),
        "scales": scales.to(torch.float16).contiguous(),
        "g_idx": g_idx.to(torch.int32).contiguous(),
    }


def unpack_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, bits: int, zero_offset: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [in, out], zeros [G, out]) as int32; zeros include the format's offset back."""
    return unpack_rows(qweight, bits), unpack_cols(qzeros, bits) + zero_offset


def dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, bits: int,
               zero_offset: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The reference dequantization: ``nn.Linear``-shaped weight [out, in] in ``dtype``."""
    codes, zeros = unpack_gptq(qweight, qzeros, bits, zero_offset)
    g = g_idx.long()
    s = scales.to(dtype)[g]  # [in, out]
    return (s * (codes.to(dtype) - zeros.to(dtype)[g])).t().contiguous()


def default_g_idx(in_features: int, group_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``i // group_size`` (every input in one group for ``group_size = -1``; a partial last group
    where the group size does not divide ``in_features``)."""
    size = group_span(in_features, group_size)
    return (torch.arange(in_features, device=device) // size).to(torch.int32)


def groups_contiguous(g_idx: torch.Tensor, in_features: int, group_size: int) -> bool:
    """Whether ``g_idx`` is :func:`default_g_idx`: every group a contiguous run of inputs (no act-order).
    It reads ``g_idx``, a synchronisation on a GPU."""
    size = group_span(in_features, group_size)
    return bool((g_idx.long() == torch.arange(in_features, device=g_idx.device) // size).all())


def group_span(in_features: int, group_size: int) -> int:
    """Input columns per full quantization group (``-1`` means one group over every column)."""
    return in_features if group_size == -1 else group_size


def group_count(in_features: int, group_size: int) -> int:
    """Groups of a linear's inputs: ``⌈in_features / group_size⌉`` (the last one partial where it does not divide)."""
    return -(-in_features // group_span(in_features, group_size))
