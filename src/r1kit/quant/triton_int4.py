"""The GPU int4 kernels: Triton code that reads GPTQ's packed tensors as they are stored.

``y = x · W`` with ``W[k, n] = scales[g, n] · (code[k, n] − zero[g, n])`` and ``g = g_idx[k]``, where
``code`` comes out of ``qweight`` (int32 [K/8, N], input ``k`` in bits ``4·(k mod 8)`` of row ``k/8``)
and ``zero`` out of ``qzeros`` (int32 [G, N/8], output ``n`` in bits ``4·(n mod 8)``) plus the
format's offset (1 for v1). Nothing is repacked at load (act-order checkpoints included), as in
GPTQ-for-LLaMa's and GPTQModel's Triton kernels. Two paths, by the number of rows ``M``:

* **M ≤ 16** (decoding): :func:`_int4_matmul_small`. Each program reads a ``BLOCK_K × BLOCK_N``
  slice of ``qweight`` once (``BLOCK_K/8`` words per column), unpacks it in registers (the weight
  never exists in float in memory) and accumulates in float32: a dot product over ``K`` for one
  row, ``tl.dot`` on a 16-row tile otherwise. Where groups are contiguous (no act-order) and a
  multiple of ``BLOCK_K``, a tile lies in one group, so its scales and zeros are one vector each;
  act-order tiles look each row's group up through ``g_idx``. A partial last group (a group size
  that does not divide ``K``) needs nothing more: its tile is masked past ``K`` like any other. A
  decode-sized product has few output tiles, so ``K`` is split over several programs that add their
  partial sums atomically (split-K, as vLLM's and GPTQModel's Triton kernels do). The launch shape
  is picked per (rows, shape, dtype) the first time it is met on a GPU, by timing
  :func:`candidate_tiles` with CUDA events, and kept (Triton's autotuning, done here so the
  interpreter needs none).
* **M > 16** (prefill): the weight is compute's to reuse, not memory's, so :func:`_int4_dequantize`
  writes it out in the activations' dtype and cuBLAS multiplies (exllama's choice for long inputs).

float16 activations meet float16 weight tiles in ``tl.dot``; bfloat16 ones go through a float32
(TF32) dot, which is the path Triton's CPU interpreter computes correctly (its bfloat16 dot does
not); float32 ones use an IEEE dot, so they match the float reference.

The kernels run on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``, set before this module
is imported), which is how the tests check them against the dequantize reference on machines
without a GPU. Importing this module needs ``triton`` (``pip install triton``; CUDA builds of torch
bring it).
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from r1kit.quant import packing

log = logging.getLogger(__name__)

SMALL_M = 16  # up to this many rows the fused kernel; above it dequantize + cuBLAS
# the self-check's tolerance: max |Δ| against the float32 reference, relative to max |reference|
CHECK_RTOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


@dataclass(frozen=True)
class Tiles:
    """One launch shape of :func:`_int4_matmul_small`: each program computes ``block_m × block_n``
    outputs over ``1/split_k`` of ``K`` (split-K programs add into a float32 buffer)."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4


def default_tiles(M: int) -> Tiles:
    """The untimed launch shape (the interpreter's): one program per 64 × 64 output tile."""
    return Tiles(1 if M == 1 else 16, 64, 64)


def candidate_tiles(M: int, K: int) -> list[Tiles]:
    """The launch shapes timed on a GPU: every split keeps at least two ``block_k`` steps per program."""
    block_m = 1 if M == 1 else 16
    return [Tiles(block_m, bn, bk, split) for bn, bk, split in itertools.product((64, 128), (64, 128), (1, 2, 4, 8))
            if K >= 2 * bk * split]


@triton.jit
def _int4_matmul_small(
    x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, out_ptr,
    M, N, K, zero_offset, k_per_split, stride_xm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TILE_GROUP: tl.constexpr,
    HALF: tl.constexpr, IEEE: tl.constexpr, ATOMIC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    zero_shift = (offs_n % 8) * 4
    nibble = tl.arange(0, 8) * 4
    if BLOCK_M == 1:
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * k_per_split
    for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        # each int32 word read once: [BLOCK_K/8, BLOCK_N] words -> [BLOCK_K/8, 8, BLOCK_N] codes -> [BLOCK_K, BLOCK_N]
        rows = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        words = tl.load(qweight_ptr + rows[:, None] * N + offs_n[None, :], mask=(rows[:, None] < K // 8) & mask_n[None, :], other=0)
        codes = tl.reshape((words[:, None, :] >> nibble[None, :, None]) & 0xF, (BLOCK_K, BLOCK_N))
        if TILE_GROUP > 0:  # groups are contiguous and a multiple of BLOCK_K: the tile lies in one group
            g = k0 // TILE_GROUP
            zeros = ((tl.load(qzeros_ptr + g * (N // 8) + offs_n // 8, mask=mask_n, other=0) >> zero_shift) & 0xF) + zero_offset
            scales = tl.load(scales_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            w = (codes - zeros[None, :]).to(tl.float32) * scales[None, :]
        else:  # act-order, or groups that do not tile: each row's group through g_idx
            group = tl.load(g_idx_ptr + offs_k, mask=mask_k, other=0)
            tile_mask = mask_k[:, None] & mask_n[None, :]
            zero_words = tl.load(qzeros_ptr + group[:, None] * (N // 8) + offs_n[None, :] // 8, mask=tile_mask, other=0)
            zeros = ((zero_words >> zero_shift[None, :]) & 0xF) + zero_offset
            scales = tl.load(scales_ptr + group[:, None] * N + offs_n[None, :], mask=tile_mask, other=0.0).to(tl.float32)
            w = (codes - zeros).to(tl.float32) * scales
        if BLOCK_M == 1:  # one row: a dot product per output, no matrix unit
            x = tl.load(x_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            acc += tl.sum(x[:, None] * w, axis=0)
        else:
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            if HALF:  # float16 tiles go to the tensor cores as they are
                acc += tl.dot(x, w.to(tl.float16))
            elif IEEE:  # float32 activations: no TF32 rounding, so results match the float reference
                acc += tl.dot(x, w, input_precision="ieee")
            else:  # bfloat16 through a float32 (TF32) dot, see the module docstring
                acc += tl.dot(x.to(tl.float32), w)
    if BLOCK_M == 1:
        out_ptrs = out_ptr + offs_n
        out_mask = mask_n
    else:
        out_ptrs = out_ptr + offs_m[:, None] * N + offs_n[None, :]
        out_mask = mask_m[:, None] & mask_n[None, :]
    if ATOMIC:  # split-K: the float32 buffer the splits add into
        tl.atomic_add(out_ptrs, acc, mask=out_mask)
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _int4_dequantize(
    qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, w_ptr, N, K, zero_offset,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
    words = tl.load(qweight_ptr + (offs_k[:, None] // 8) * N + offs_n[None, :], mask=mask, other=0)
    codes = (words >> ((offs_k[:, None] % 8) * 4)) & 0xF
    group = tl.load(g_idx_ptr + offs_k, mask=offs_k < K, other=0)
    zero_words = tl.load(qzeros_ptr + group[:, None] * (N // 8) + offs_n[None, :] // 8, mask=mask, other=0)
    zeros = ((zero_words >> ((offs_n[None, :] % 8) * 4)) & 0xF) + zero_offset
    scales = tl.load(scales_ptr + group[:, None] * N + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(w_ptr + offs_k[:, None] * N + offs_n[None, :], ((codes - zeros).to(tl.float32) * scales).to(w_ptr.dtype.element_ty), mask=mask)


def dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
               zero_offset: int = 1, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The float weight [K, N] (inputs × outputs, as GPTQ stores it) in ``dtype``, on the tensors' device."""
    K, N = qweight.shape[0] * 8, qweight.shape[1]
    w = torch.empty((K, N), dtype=dtype, device=qweight.device)
    grid = (triton.cdiv(K, 64), triton.cdiv(N, 64))
    _int4_dequantize[grid](qweight, qzeros, scales, g_idx, w, N, K, zero_offset, BLOCK_K=64, BLOCK_N=64)
    return w


def _launch(x2, qweight, qzeros, scales, g_idx, zero_offset, group_k, t: Tiles) -> torch.Tensor:
    M, K = x2.shape
    N = qweight.shape[1]
    atomic = t.split_k > 1
    # split-K sums its parts with float32 atomics (their order varies: the last bits can differ run to run)
    out = torch.zeros((M, N), dtype=torch.float32, device=x2.device) if atomic else torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    k_per_split = triton.cdiv(triton.cdiv(K, t.split_k), t.block_k) * t.block_k
    grid = (triton.cdiv(M, t.block_m), triton.cdiv(N, t.block_n), t.split_k)
    _int4_matmul_small[grid](
        x2, qweight, qzeros, scales, g_idx, out, M, N, K, zero_offset, k_per_split, x2.stride(0),
        BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k,
        TILE_GROUP=group_k if group_k and group_k % t.block_k == 0 else 0,
        HALF=x2.dtype == torch.float16, IEEE=x2.dtype == torch.float32, ATOMIC=atomic, num_warps=t.num_warps,
    )
    return out


def cuda_time(fn, reps: int = 10) -> float:
    """Milliseconds of ``reps`` calls of ``fn`` after three warm-up calls (the first compiles), by CUDA events."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


class TileChooser:
    """The launch shape of each (device, one row or several, N, K, dtype, group) met so far: on the
    ``devices`` it times (GPUs) the fastest of :func:`candidate_tiles` by ``timer`` at first use;
    elsewhere (the interpreter) the default. A candidate counts only if it runs and its result on
    that first input agrees with the dequantize reference (PyTorch), so a shape this GPU cannot run
    or miscomputes is never chosen; None where no candidate qualifies (the caller then dequantizes)."""

    def __init__(self, timer=cuda_time, devices: tuple[str, ...] = ("cuda",)) -> None:
        self.timer, self.devices = timer, devices
        self.chosen: dict[tuple, Tiles | None] = {}

    def __call__(self, x2, qweight, qzeros, scales, g_idx, zero_offset, group_k) -> Tiles | None:
        M, K = x2.shape
        N = qweight.shape[1]
        if x2.device.type not in self.devices:
            return default_tiles(M)
        key = (x2.device, M == 1, N, K, x2.dtype, group_k)
        if key in self.chosen:
            return self.chosen[key]
        tiles, judged = self._choose(x2, qweight, qzeros, scales, g_idx, zero_offset, group_k, key)
        if judged:
            self.chosen[key] = tiles
        return tiles

    def _choose(self, x2, qweight, qzeros, scales, g_idx, zero_offset, group_k, key) -> tuple[Tiles | None, bool]:
        """(the fastest correct shape or None, whether this input could judge: zeros or non-finite
        values cannot, and then the default runs this once and a later input decides)."""
        # the reference on up to 32 blocks of 8 columns (one qzeros word each) spread over N, in
        # float64 (a float32 product may run as TF32 on the GPU, less exact than the kernel it would
        # judge); only those columns are dequantized, so a large layer costs no large buffer
        words = qzeros.shape[1]
        blocks = torch.linspace(0, words - 1, min(32, words), device=x2.device).long().unique()
        columns = (blocks[:, None] * 8 + torch.arange(8, device=x2.device)).flatten()
        weight = packing.dequantize(qweight[:, columns], qzeros[:, blocks], scales[:, columns], g_idx, 4, zero_offset)
        want = x2.double() @ weight.double().T
        scale = float(want.abs().max())
        if not math.isfinite(scale) or scale == 0:
            return default_tiles(x2.shape[0]), False
        bound = CHECK_RTOL.get(x2.dtype, CHECK_RTOL[torch.float32]) * scale
        timed, failures = [], []
        for t in candidate_tiles(*x2.shape) or [default_tiles(x2.shape[0])]:
            launch = functools.partial(_launch, x2, qweight, qzeros, scales, g_idx, zero_offset, group_k, t)
            try:  # a shape this GPU cannot run (e.g. out of shared memory) is not a candidate
                error = float((launch()[:, columns].double() - want).abs().max())
                if not error <= bound:
                    raise RuntimeError(f"disagrees with the dequantize reference: max |Δ| {error:.2e}, bound {bound:.2e}")
                timed.append((self.timer(launch), t))
            except Exception as exc:
                failures.append(f"{t}: {exc!r}")
        if not timed:
            log.warning("no int4 launch shape runs correctly for %s; dequantizing instead (%s)", key, "; ".join(failures)[:2000])
            return None, True
        return min(timed, key=lambda pair: pair[0])[1], True


choose_tiles = TileChooser()  # one per process, like Triton's autotuning cache


def int4_gptq_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                     g_idx: torch.Tensor, zero_offset: int = 1, group_k: int = 0, tiles: Tiles | None = None) -> torch.Tensor:
    """``x`` [..., K] times the GPTQ 4-bit weight [K, N]: [..., N] in ``x``'s dtype (no bias).

    ``group_k``: the group size when ``g_idx`` is the contiguous ``k // group_k`` (no act-order),
    which lets a tile read one scale vector; 0 when unknown or act-order. ``tiles``: the launch shape
    of the ≤ 16-row kernel (default: :data:`choose_tiles`)."""
    K, N = qweight.shape[0] * 8, qweight.shape[1]
    if x.shape[-1] != K:
        raise ValueError(f"input has {x.shape[-1]} features, the int4 weight expects {K}")
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise TypeError("qweight and qzeros must be int32 (the GPTQ layout)")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    if M == 0:
        return x2.new_empty((*lead, N))
    qweight, qzeros, scales = qweight.contiguous(), qzeros.contiguous(), scales.contiguous()
    g_idx = g_idx.to(torch.int32).contiguous()
    if M > SMALL_M:
        return (x2 @ dequantize(qweight, qzeros, scales, g_idx, zero_offset, x.dtype)).reshape(*lead, N)
    t = tiles or choose_tiles(x2, qweight, qzeros, scales, g_idx, zero_offset, group_k)
    if t is None:  # no launch shape ran correctly here for this shape: see TileChooser
        return (x2 @ dequantize(qweight, qzeros, scales, g_idx, zero_offset, x.dtype)).reshape(*lead, N)
    return _launch(x2, qweight, qzeros, scales, g_idx, zero_offset, group_k, t).to(x.dtype).reshape(*lead, N)


def _self_check(device: torch.device, dtype: torch.dtype) -> None:
    """Every path of :func:`int4_gptq_matmul` on small random layers against the dequantize reference
    (PyTorch): one row and a few rows over contiguous groups and act-order, and many rows (dequantize
    + cuBLAS), with a partial last group. Raises where a result is wrong."""
    g = torch.Generator().manual_seed(0)
    K, N, group = 224, 128, 64  # K not a multiple of the group: a partial last group, as GPTQModel writes one
    groups = packing.group_count(K, group)
    codes = torch.randint(0, 16, (N, K), generator=g, dtype=torch.int32)
    zeros = torch.randint(1, 16, (groups, N), generator=g, dtype=torch.int32)
    scales = (torch.rand(groups, N, generator=g) * 0.05 + 0.01).half()
    for act_order in (False, True):
        g_idx = packing.default_g_idx(K, group)
        if act_order:
            g_idx = g_idx[torch.randperm(K, generator=g)]
        t = {k: v.to(device) for k, v in packing.pack_gptq(codes, zeros, scales, g_idx, 4).items()}
        weight = packing.dequantize(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4).double()  # [N, K]
        for rows in (1, 5, SMALL_M + 4):
            x = torch.randn(rows, K, generator=g).to(device, dtype)
            want = x.double() @ weight.T
            # the default launch shape itself: through the tile chooser, a wrong kernel would be
            # replaced by the dequantize path and pass
            tiles = default_tiles(rows) if rows <= SMALL_M else None
            out = int4_gptq_matmul(x, t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 1, 0 if act_order else group, tiles)
            error = float((out.double() - want).abs().max() / want.abs().max())
            if not error <= CHECK_RTOL[dtype]:
                raise RuntimeError(f"int4 self-check mismatch ({rows} rows, act_order={act_order}, {dtype}): max |Δ| {error:.2e} of max |output|")


@functools.cache
def verified(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this device runs the kernels correctly in ``dtype`` (:func:`_self_check`, once per device
    and dtype and process). False, with a warning, where they fail to compile, launch or agree: then
    ``QuantLinear``'s ``auto`` backend keeps the dequantize path there, as the engine's decode
    attention keeps its gather path when its Triton kernel fails its check."""
    try:
        _self_check(device, dtype)
        return True
    except Exception as exc:  # a compiler error, a launch failure, a wrong result: the reference path instead
        log.warning("Triton int4 kernels unavailable on %s for %s, int4 layers dequantize instead: %r", device, dtype, exc)
        return False
