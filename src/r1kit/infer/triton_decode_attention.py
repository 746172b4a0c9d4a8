"""Paged decode attention on the GPU: the Triton twin of :mod:`r1kit.infer.decode_attention`.

One program per (sequence, KV head) follows the sequence's block table and reads that head's keys
and values in place, ``BLOCK_N`` positions at a time, for the whole group of query heads that share
it (GQA: K/V read once per group). Softmax is computed online (running max and sum, as flash
attention does), in float32 whatever the pool's dtype. Row ``s`` attends to positions
``[lowest[s], contexts[s])``, so local layers pass their window's first position (the model's
:func:`~r1kit.model.attention.window_start`). No gather of
the context out of the pool, no mask, one launch per layer; without it a CUDA decode step gathers
K/V and runs a masked SDPA per layer.

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

log = logging.getLogger(__name__)

BLOCK_N = 32  # positions per step of the loop over the context


@functools.cache
def _kernel():
    """The jitted kernel, defined once (Triton imported only when a GPU, or the interpreter, needs it)."""
    import triton
    import triton.language as tl

    @triton.jit
    def paged_decode(
        q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, contexts_ptr, lowest_ptr,
        table_width, block_size, scale,
        stride_ks, stride_kh,  # the pools are [slots, Hkv, D]: slot and head strides (D is contiguous)
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, DIM: tl.constexpr, DIM_PAD: tl.constexpr, BLOCK: tl.constexpr,
    ):
        s = tl.program_id(0)
        h = tl.program_id(1)
        heads = tl.num_programs(1) * GROUP
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, DIM_PAD)
        g_mask = g < GROUP
        d_mask = d < DIM
        q_rows = s * heads + h * GROUP + g  # q and out are [S, Hq, D] with Hq = Hkv · GROUP
        q = tl.load(q_ptr + q_rows[:, None] * DIM + d[None, :], mask=g_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        context = tl.load(contexts_ptr + s)
        start = tl.load(lowest_ptr + s)
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
        out = acc / l_i[:, None]
        tl.store(out_ptr + q_rows[:, None] * DIM + d[None, :], out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])

    return paged_decode


class TritonPagedDecode:
    """Decode attention over the paged pool; the interface of
    :class:`r1kit.infer.decode_attention.PagedDecodeKernel`."""

    def __init__(self) -> None:
        self._paged_decode = _kernel()

    def supports(self, dtype: torch.dtype, device: torch.device) -> bool:
        interpreted = os.environ.get("TRITON_INTERPRET") == "1"
        return dtype in (torch.float32, torch.bfloat16, torch.float16) and (device.type == "cuda" or (interpreted and device.type == "cpu"))

    def __call__(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, tables: torch.Tensor,
                 contexts: torch.Tensor, lowest: torch.Tensor, block_size: int) -> torch.Tensor:
        """``q`` [S, Hq, 1, D], pools [slots, Hkv, D], ``tables`` [S, W] block ids, ``contexts``/``lowest``
        [S]: row ``s`` attends to positions ``[lowest[s], contexts[s])``. Returns [S, Hq, 1, D] in ``q``'s dtype."""
        import triton

        seqs, hq, _, dim = q.shape
        hkv = k_pool.shape[1]
        if hq % hkv:
            raise ValueError(f"paged decode attention: {hq} query heads do not group over {hkv} KV heads")
        if k_pool.stride(-1) != 1 or v_pool.stride() != k_pool.stride():
            raise ValueError("paged decode attention: the K and V pools must share one layout with a contiguous head dim")
        group = hq // hkv
        q3 = q.reshape(seqs, hq, dim).contiguous()
        out = torch.empty_like(q3)
        self._paged_decode[(seqs, hkv)](
            q3, k_pool, v_pool, out, tables.contiguous(), contexts.contiguous(), lowest.contiguous(),
            tables.shape[1], block_size, dim**-0.5, k_pool.stride(0), k_pool.stride(1),
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
    for s in range(2):
        pos = torch.arange(int(lowest[s]), int(contexts[s]), device=device)
        slots = tables[s][pos // block_size] * block_size + pos % block_size
        keys, values = k_pool[slots].repeat_interleave(2, 1), v_pool[slots].repeat_interleave(2, 1)  # [n, 4, D]
        weights = torch.softmax(torch.einsum("hd,nhd->hn", q[s, :, 0], keys) / dim**0.5, dim=-1)
        want = torch.einsum("hn,nhd->hd", weights, values)
        if not torch.allclose(out[s, :, 0], want, atol=1e-4, rtol=1e-4):
            raise RuntimeError(f"self-check mismatch: max |Δ| {float((out[s, :, 0] - want).abs().max()):.2e}")


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
