"""Decode attention that reads the paged KV pool in place: a small C kernel, built on first use.

Without it a decode step copies every sequence's whole context out of the pool into a padded
``[B, Hkv, n, D]`` tensor, for every layer, and SDPA then reads that copy: the context crosses memory
three times (read, write, read) and the copy is rebuilt each step although one token changed. The
kernel (``csrc/paged_decode_attention.c``) follows each sequence's block table and reads each key and
value once, for all the query heads that share it (GQA). One query token per sequence: prefill
chunks keep the gather path, where the copy is small beside their compute.

Built on first use by :mod:`r1kit.native` (``-O3 -march=native``, cached on disk). Where nothing can
be built (no compiler), :func:`load_kernel` returns None and the engine keeps the gather path.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from r1kit import native
from r1kit.infer.paged_cache import PagedRange

SOURCE = Path(__file__).parent / "csrc" / "paged_decode_attention.c"
DTYPES = {torch.float32: "paged_decode_attention_f32", torch.bfloat16: "paged_decode_attention_bf16"}
FUSED = {torch.float32: "paged_decode_rope_attention_f32", torch.bfloat16: "paged_decode_rope_attention_bf16"}
HYBRID = {torch.float32: "paged_decode_hybrid_f32", torch.bfloat16: "paged_decode_hybrid_bf16"}
STATUS = {1: "bad head grouping or odd head dim", 2: "out of memory"}


def build(cache: Path | None = None) -> Path:
    """Compile the kernel (or find it already built); the path of the shared library."""
    return native.build(SOURCE, cache)


class PagedDecodeKernel:
    """The loaded library; :meth:`__call__` runs one layer's decode attention, :meth:`rope_attend`
    the same with the rotary embedding and the K/V write folded in, :meth:`hybrid` a hybrid layer's
    two branches and their mix."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        pointer, i64 = ctypes.c_void_p, ctypes.c_int64
        self._fns, self._fused = {}, {}
        for dtype, name in DTYPES.items():
            fn = getattr(lib, name)
            fn.argtypes = [pointer] * 5 + [i64, pointer, pointer] + [i64] * 5 + [ctypes.c_float]
            fn.restype = ctypes.c_int
            self._fns[dtype] = fn
        for dtype, name in FUSED.items():
            fn = getattr(lib, name)
            fn.argtypes = [pointer] * 8 + [i64, pointer, pointer] + [i64] * 5 + [ctypes.c_float]
            fn.restype = ctypes.c_int
            self._fused[dtype] = fn
        self._hybrid = {}
        for dtype, name in HYBRID.items():
            fn = getattr(lib, name)
            fn.argtypes = [pointer] * 4 + [i64, pointer, pointer, i64] + [pointer] * 3 + [i64, pointer, pointer, i64] + [pointer] * 3 + [i64] * 4 + [ctypes.c_float]
            fn.restype = ctypes.c_int
            self._hybrid[dtype] = fn

    def supports(self, dtype: torch.dtype, device: torch.device) -> bool:
        return device.type == "cpu" and dtype in self._fns

    def __call__(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, tables: torch.Tensor,
                 contexts: torch.Tensor, lowest: torch.Tensor, block_size: int) -> torch.Tensor:
        """``q`` [S, Hq, 1, D] (one token per sequence), pools [slots, Hkv, D], ``tables`` int64 [S, W]
        block ids, ``contexts``/``lowest`` int64 [S]: row ``s`` attends to positions
        ``[lowest[s], contexts[s])`` (a local layer's ``lowest`` is the model's
        :func:`~r1kit.model.attention.window_start` of the query's position). Returns [S, Hq, 1, D] in ``q``'s dtype."""
        seqs, hq, _, dim = q.shape
        hkv = k_pool.shape[1]
        for t, what in ((k_pool, "k_pool"), (v_pool, "v_pool"), (tables, "tables"), (contexts, "contexts"), (lowest, "lowest")):
            if not t.is_contiguous():
                raise ValueError(f"paged decode attention: {what} must be contiguous")
        if tables.dtype != torch.int64 or contexts.dtype != torch.int64 or lowest.dtype != torch.int64:
            raise TypeError("paged decode attention: tables, contexts and lowest must be int64")
        q32 = q.reshape(seqs, hq, dim).to(torch.float32).contiguous()
        out = torch.empty_like(q32)
        status = self._fns[k_pool.dtype](
            q32.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr(), out.data_ptr(), tables.data_ptr(), tables.shape[1],
            contexts.data_ptr(), lowest.data_ptr(), seqs, hq, hkv, dim, block_size, dim**-0.5,
        )
        if status:
            raise RuntimeError(f"paged decode attention failed (status {status}: {STATUS.get(status, 'unknown')})")
        return out.to(q.dtype).view(seqs, hq, 1, dim)

    def hybrid(self, q: torch.Tensor, local: PagedRange, glob: PagedRange, gate: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """A hybrid layer's decode attention: ``q`` [S, Hq, 1, D] over its ``local`` range and, for the
        rows whose ``skip`` (int64 [S]) is 0, its ``glob`` range (the same pools from position 0, or the
        compressed cache's pooled entries; both pools in one dtype), mixed per query head as
        ``gate·local + (1 − gate)·global`` (``gate``: float32 [S, Hq]); a skipped row is its local
        branch alone and reads no global key. Returns [S, Hq, 1, D] in ``q``'s dtype."""
        seqs, hq, _, dim = q.shape
        for r, what in ((local, "local"), (glob, "global")):
            for t in r[:5]:
                if not t.is_contiguous() or (t.dtype != local.k.dtype if t.is_floating_point() else t.dtype != torch.int64):
                    raise ValueError(f"paged decode attention: the {what} range's tensors must be contiguous, pools in one dtype, indices int64")
        if gate.dtype != torch.float32 or gate.shape != (seqs, hq) or skip.dtype != torch.int64 or skip.shape != (seqs,):
            raise ValueError(f"paged decode attention: gate must be float32 [{seqs}, {hq}] and skip int64 [{seqs}]; "
                             f"got {gate.dtype} {tuple(gate.shape)}, {skip.dtype} {tuple(skip.shape)}")
        q32 = q.reshape(seqs, hq, dim).to(torch.float32).contiguous()
        out = torch.empty_like(q32)
        status = self._hybrid[local.k.dtype](
            q32.data_ptr(), local.k.data_ptr(), local.v.data_ptr(), local.tables.data_ptr(), local.tables.shape[1],
            local.contexts.data_ptr(), local.lowest.data_ptr(), local.block_size,
            glob.k.data_ptr(), glob.v.data_ptr(), glob.tables.data_ptr(), glob.tables.shape[1], glob.contexts.data_ptr(),
            glob.lowest.data_ptr(), glob.block_size, gate.contiguous().data_ptr(), skip.contiguous().data_ptr(), out.data_ptr(),
            seqs, hq, local.k.shape[1], dim, dim**-0.5,
        )
        if status:
            raise RuntimeError(f"paged decode attention failed (status {status}: {STATUS.get(status, 'unknown')})")
        return out.to(q.dtype).view(seqs, hq, 1, dim)

    def rope_attend(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                    slots: torch.Tensor, tables: torch.Tensor, contexts: torch.Tensor, lowest: torch.Tensor, block_size: int,
                    num_heads: int) -> torch.Tensor:
        """One decode step of a layer from its fused q/k/v projection: ``qkv`` [S, 1, (Hq + 2·Hkv)·D]
        (one token per sequence, heads in q, k, v order), ``cos``/``sin`` [S, 1, D] as
        :class:`~r1kit.model.rope.RotaryEmbedding` returns them (sin's first half negated), all in the
        pools' dtype. Rotates q and k, writes k and v into slot ``slots[s]`` (int64 [S]) of the pools,
        then attends as :meth:`__call__` does. Returns [S, 1, Hq·D] (the heads side by side, as the
        output projection takes them). The pools, tables, contexts and lowest are the engine's own
        (contiguous, int64): only the per-step tensors are checked."""
        seqs, hkv, dim = qkv.shape[0], k_pool.shape[1], k_pool.shape[2]
        if qkv.shape[-1] != (num_heads + 2 * hkv) * dim or qkv.numel() != seqs * qkv.shape[-1]:
            raise ValueError(f"paged decode attention: qkv {tuple(qkv.shape)} is not one token of {num_heads} + 2·{hkv} heads of {dim} per sequence")
        if not (qkv.dtype == cos.dtype == sin.dtype == k_pool.dtype) or not (qkv.is_contiguous() and cos.is_contiguous() and sin.is_contiguous()):
            raise ValueError("paged decode attention: qkv, cos and sin must be contiguous and in the pools' dtype")
        if cos.numel() != seqs * dim or sin.numel() != seqs * dim or slots.numel() != seqs or slots.dtype != torch.int64:
            raise ValueError(f"paged decode attention: cos and sin need one row of {dim} per sequence ({seqs}), slots one int64 each; "
                             f"got {tuple(cos.shape)}, {tuple(sin.shape)}, {tuple(slots.shape)} {slots.dtype}")
        out = torch.empty(seqs, 1, num_heads * dim, dtype=qkv.dtype)
        status = self._fused[k_pool.dtype](
            qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr(), slots.data_ptr(), out.data_ptr(),
            tables.data_ptr(), tables.shape[1], contexts.data_ptr(), lowest.data_ptr(), seqs, num_heads, hkv, dim, block_size, dim**-0.5,
        )
        if status:
            raise RuntimeError(f"paged decode attention failed (status {status}: {STATUS.get(status, 'unknown')})")
        return out


@functools.cache
def load_kernel() -> PagedDecodeKernel | None:
    """The kernel, built once per process (and once per machine, cached on disk); None where it cannot be built."""
    lib = native.load(SOURCE, "decoding gathers K/V instead")
    return None if lib is None else PagedDecodeKernel(lib)
