"""Paged decode attention on the GPU: the Triton twin of :mod:`r1kit.infer.decode_attention`.

One program per (sequence, KV head) follows the sequence's block table and reads that head's keys
and values in place, ``BLOCK_N`` positions at a time, for the whole group of query heads that share
it (GQA: K/V read once per group). Softmax is computed online (running max and sum, as flash
attention does), in float32 whatever the pool's dtype. Row ``s`` attends to positions
``[lowest[s], contexts[s])``, so local layers pass their window's first position (the model's
:func:`~r1kit.model.attention.window_start`). No gather of
the context out of the pool, no mask, one launch per layer; without it a CUDA decode step gathers
K/V and runs a masked SDPA per layer. A hybrid layer's step is one launch too
(:meth:`TritonPagedDecode.hybrid`): its local branch, its global branch (the pool from position 0,
or the compressed cache's pooled entries) unless the hard gate skips the sequence, and their mix.

The query heads of a group are padded to 16 rows, the smallest ``tl.dot`` tile, and the head dim to
a power of two (both masked). Both products use IEEE float32 dots, so results match a float32
reference to rounding. The same kernel runs on the CPU under Triton's interpreter
(``TRITON_INTERPRET=1``), which is how the tests check it and the engine through it without a GPU.

:func:`load_triton_kernel` compiles and runs it once on a small problem against PyTorch before the
engine uses it: where that fails (a GPU or Triton version it does not build for), the engine logs
why and gathers K/V instead, as it does on a CPU without a C compiler.
"""

from __future__ import annotations

import functools
import logging
import os

import torch
import triton
import triton.language as tl

from r1kit.infer.paged_cache import PagedRange

log = logging.getLogger(__name__)

BLOCK_N = 32  # positions per step of the loop over the context


@triton.jit
def attend_range(
    q, k_ptr, v_ptr, tables_ptr, s, h, table_width, block_size, start, context, scale, stride_ks, stride_kh, d, d_mask,
    GROUP_PAD: tl.constexpr, DIM_PAD: tl.constexpr, BLOCK: tl.constexpr,
):
    # softmax(q·kᵀ)·v of one KV head's query group over positions [start, context); zeros where there are none
    m_i = tl.full((GROUP_PAD,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((GROUP_PAD,), dtype=tl.float32)
    acc = tl.zeros((GROUP_PAD, DIM_PAD), dtype=tl.float32)
    for p0 in range(start, context, BLOCK):
        pos = p0 + tl.arange(0, BLOCK)
        valid = pos < context
        block = tl.load(tables_ptr + s * table_width + pos // block_size, mask=valid, other=0)
        slots = block * block_size + pos % block_size
        kv_offsets = slots[:, None] * stride_ks + h * stride_kh + d[None, :]
        kv_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + kv_offsets, mask=kv_mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + kv_offsets, mask=kv_mask, other=0.0).to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m_i = m_new
    return acc / tl.maximum(l_i, 1.0)[:, None]  # a visited row's sum is >= 1 (its largest term is exp(0))


@triton.jit
def query_tile(q_ptr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, DIM: tl.constexpr, DIM_PAD: tl.constexpr):
    """This program's sequence ``s`` and K/V head ``h``, and the GROUP query heads that share it: their
    rows of q/out ([S, Hq, D] with Hq = Hkv · GROUP), the masks of the padded tile, q in float32."""
    s = tl.program_id(0)
    h = tl.program_id(1)
    heads = tl.num_programs(1) * GROUP
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, DIM_PAD)
    g_mask = g < GROUP
    d_mask = d < DIM
    q_rows = s * heads + h * GROUP + g
    q = tl.load(q_ptr + q_rows[:, None] * DIM + d[None, :], mask=g_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
    return s, h, q, q_rows, g_mask, d, d_mask


@triton.jit
def paged_decode(
    q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, contexts_ptr, lowest_ptr,
    table_width, block_size, scale,
    stride_ks, stride_kh,  # the pools are [slots, Hkv, D]: slot and head strides (D is contiguous)
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, DIM: tl.constexpr, DIM_PAD: tl.constexpr, BLOCK: tl.constexpr,
):
    s, h, q, q_rows, g_mask, d, d_mask = query_tile(q_ptr, GROUP, GROUP_PAD, DIM, DIM_PAD)
    out = attend_range(q, k_ptr, v_ptr, tables_ptr, s, h, table_width, block_size, tl.load(lowest_ptr + s), tl.load(contexts_ptr + s),
                       scale, stride_ks, stride_kh, d, d_mask, GROUP_PAD, DIM_PAD, BLOCK)
    tl.store(out_ptr + q_rows[:, None] * DIM + d[None, :], out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])

@triton.jit
def paged_decode_hybrid(
    q_ptr, out_ptr, gate_ptr, skip_ptr, scale,
    k_ptr, v_ptr, tables_ptr, contexts_ptr, lowest_ptr, table_width, block_size, stride_ks, stride_kh,
    gk_ptr, gv_ptr, gtables_ptr, gcontexts_ptr, glowest_ptr, gtable_width, gblock_size, stride_gs, stride_gh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, DIM: tl.constexpr, DIM_PAD: tl.constexpr, BLOCK: tl.constexpr,
):
    # the local branch, then (unless the hard gate skips the sequence) the global one, mixed per query head
    s, h, q, q_rows, g_mask, d, d_mask = query_tile(q_ptr, GROUP, GROUP_PAD, DIM, DIM_PAD)
    out = attend_range(q, k_ptr, v_ptr, tables_ptr, s, h, table_width, block_size, tl.load(lowest_ptr + s), tl.load(contexts_ptr + s),
                       scale, stride_ks, stride_kh, d, d_mask, GROUP_PAD, DIM_PAD, BLOCK)
    if tl.load(skip_ptr + s) == 0:
        glob = attend_range(q, gk_ptr, gv_ptr, gtables_ptr, s, h, gtable_width, gblock_size, tl.load(glowest_ptr + s),
                            tl.load(gcontexts_ptr + s), scale, stride_gs, stride_gh, d, d_mask, GROUP_PAD, DIM_PAD, BLOCK)
        w = tl.load(gate_ptr + q_rows, mask=g_mask, other=0.0)[:, None]
        out = w * out + (1.0 - w) * glob
    tl.store(out_ptr + q_rows[:, None] * DIM + d[None, :], out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])


class TritonPagedDecode:
    """Decode attention over the paged pool; the interface of
    :class:`r1kit.infer.decode_attention.PagedDecodeKernel`."""

    def supports(self, dtype: torch.dtype, device: torch.device) -> bool:
        interpreted = os.environ.get("TRITON_INTERPRET") == "1"
        return dtype in (torch.float32, torch.bfloat16, torch.float16) and (device.type == "cuda" or (interpreted and device.type == "cpu"))

    def __call__(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, tables: torch.Tensor,
                 contexts: torch.Tensor, lowest: torch.Tensor, block_size: int) -> torch.Tensor:
        """``q`` [S, Hq, 1, D], pools [slots, Hkv, D], ``tables`` [S, W] block ids, ``contexts``/``lowest``
        [S]: row ``s`` attends to positions ``[lowest[s], contexts[s])``. Returns [S, Hq, 1, D] in ``q``'s dtype."""
        seqs, hq, _, dim = q.shape
        hkv = k_pool.shape[1]
        if hq % hkv:
            raise ValueError(f"paged decode attention: {hq} query heads do not group over {hkv} KV heads")
        if k_pool.stride(-1) != 1 or v_pool.stride() != k_pool.stride():
            raise ValueError("paged decode attention: the K and V pools must share one layout with a contiguous head dim")
        group = hq // hkv
        q3 = q.reshape(seqs, hq, dim).contiguous()
        out = torch.empty_like(q3)
        paged_decode[(seqs, hkv)](
            q3, k_pool, v_pool, out, tables.contiguous(), contexts.contiguous(), lowest.contiguous(),
            tables.shape[1], block_size, dim**-0.5, k_pool.stride(0), k_pool.stride(1),
            GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), DIM=dim, DIM_PAD=max(16, triton.next_power_of_2(dim)),
            BLOCK=BLOCK_N,
        )
        return out.view(seqs, hq, 1, dim)

    def hybrid(self, q: torch.Tensor, local: PagedRange, glob: PagedRange, gate: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """A hybrid layer's decode attention, as :meth:`r1kit.infer.decode_attention.PagedDecodeKernel.hybrid`:
        the ``local`` branch, the ``glob`` one for rows whose ``skip`` is 0, mixed per query head by
        ``gate`` [S, Hq]. Returns [S, Hq, 1, D] in ``q``'s dtype."""
        seqs, hq, _, dim = q.shape
        hkv = local.k.shape[1]
        if hq % hkv:
            raise ValueError(f"paged decode attention: {hq} query heads do not group over {hkv} KV heads")
        for r in (local, glob):
            if r.k.stride(-1) != 1 or r.v.stride() != r.k.stride() or r.k.shape[1:] != local.k.shape[1:]:
                raise ValueError("paged decode attention: each range's K and V pools must share one layout with a contiguous head dim")
        group = hq // hkv
        q3 = q.reshape(seqs, hq, dim).contiguous()
        out = torch.empty_like(q3)
        paged_decode_hybrid[(seqs, hkv)](
            q3, out, gate.to(torch.float32).contiguous(), skip.contiguous(), dim**-0.5,
            local.k, local.v, local.tables.contiguous(), local.contexts.contiguous(), local.lowest.contiguous(), local.tables.shape[1],
            local.block_size, local.k.stride(0), local.k.stride(1),
            glob.k, glob.v, glob.tables.contiguous(), glob.contexts.contiguous(), glob.lowest.contiguous(), glob.tables.shape[1],
            glob.block_size, glob.k.stride(0), glob.k.stride(1),
            GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), DIM=dim, DIM_PAD=max(16, triton.next_power_of_2(dim)),
            BLOCK=BLOCK_N,
        )
        return out.view(seqs, hq, 1, dim)


def _self_check(kernel: TritonPagedDecode, device: torch.device) -> None:
    """Two sequences over several loop steps (one with a window), GQA 2, against softmax attention
    written with PyTorch."""
    g = torch.Generator().manual_seed(0)
    block_size, dim = 4, 64
    k_pool, v_pool = (torch.randn(40 * block_size, 2, dim, generator=g).to(device) for _ in range(2))
    q = torch.randn(2, 4, 1, dim, generator=g).to(device)
    tables = torch.randperm(40, generator=g)[:36].view(2, 18).to(device)
    contexts, lowest = torch.tensor([45, 70], device=device), torch.tensor([0, 30], device=device)
    out = kernel(q, k_pool, v_pool, tables, contexts, lowest, block_size)
    # the hybrid call: that windowed range mixed with the whole context, the second row skipping it
    gate, skip = torch.full((2, 4), 0.25, device=device), torch.tensor([0, 1], device=device)
    windowed = torch.tensor([20, 30], device=device)
    mixed = kernel.hybrid(q, PagedRange(k_pool, v_pool, tables, contexts, windowed, block_size),
                          PagedRange(k_pool, v_pool, tables, contexts, torch.zeros_like(lowest), block_size), gate, skip)

    def attention(s: int, low: int) -> torch.Tensor:
        pos = torch.arange(low, int(contexts[s]), device=device)
        slots = tables[s][pos // block_size] * block_size + pos % block_size
        keys, values = k_pool[slots].repeat_interleave(2, 1), v_pool[slots].repeat_interleave(2, 1)  # [n, 4, D]
        weights = torch.softmax(torch.einsum("hd,nhd->hn", q[s, :, 0], keys) / dim**0.5, dim=-1)
        return torch.einsum("hn,nhd->hd", weights, values)

    for s in range(2):
        want, local = attention(s, int(lowest[s])), attention(s, int(windowed[s]))
        want_mixed = local if s else 0.25 * local + 0.75 * attention(s, 0)
        for got, expected in ((out[s, :, 0], want), (mixed[s, :, 0], want_mixed)):
            if not torch.allclose(got, expected, atol=1e-4, rtol=1e-4):
                raise RuntimeError(f"self-check mismatch: max |Δ| {float((got - expected).abs().max()):.2e}")


@functools.cache
def load_triton_kernel(device: torch.device) -> TritonPagedDecode | None:
    """The kernel, checked once per device and process; None (with a warning) where it cannot run."""
    try:
        kernel = TritonPagedDecode()
        _self_check(kernel, device)
        return kernel
    except Exception as exc:  # no triton, a compiler error, a launch failure, a wrong result: gather instead
        log.warning("Triton paged decode attention unavailable on %s, decoding gathers K/V instead: %r", device, exc)
        return None
