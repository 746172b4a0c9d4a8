"""The GPU int4 kernel: a Triton matmul that reads GPTQ's packed tensors as they are stored.

``y = x · W`` with ``W[k, n] = scales[g, n] · (code[k, n] − zero[g, n])`` and ``g = g_idx[k]``, where
``code`` comes out of ``qweight`` (int32 [K/8, N], input ``k`` in bits ``4·(k mod 8)`` of row ``k/8``)
and ``zero`` out of ``qzeros`` (int32 [G, N/8], output ``n`` in bits ``4·(n mod 8)``) plus the
format's offset (1 for v1). Each program computes one ``BLOCK_M × BLOCK_N`` tile of ``y``: it walks
``K`` in ``BLOCK_K`` steps, unpacks that slice of ``W`` in registers (the weight never exists in
float in memory), and accumulates ``x_tile · W_tile`` in float32 with ``tl.dot``. Because every input
row looks its group up through ``g_idx``, act-order checkpoints need no reordering. This is the
layout-preserving design of GPTQ-for-LLaMa's and GPTQModel's Triton kernels: no repacking at load.
float16 activations meet float16 weight tiles in the dot; bfloat16 ones go through a float32 (TF32)
dot, which costs nothing where decoding is bound by weight reads and is the path Triton's CPU
interpreter computes correctly (its bfloat16 dot does not); float32 ones use an IEEE dot.

The same kernel runs on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``, set before this
module is imported), which is how the tests check it against the dequantize reference on machines
without a GPU. Importing this module needs ``triton`` (``pip install triton``; CUDA builds of torch
bring it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = 64
BLOCK_K = 64


@triton.jit
def _int4_gptq_matmul(
    x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, out_ptr,
    M, N, K, zero_offset,
    stride_xm, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HALF: tl.constexpr, IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    zero_shift = (offs_n % 8) * 4
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        tile_mask = mask_k[:, None] & mask_n[None, :]
        words = tl.load(qweight_ptr + (offs_k[:, None] // 8) * N + offs_n[None, :], mask=tile_mask, other=0)
        codes = (words >> ((offs_k[:, None] % 8) * 4)) & 0xF
        group = tl.load(g_idx_ptr + offs_k, mask=mask_k, other=0)
        zero_words = tl.load(qzeros_ptr + group[:, None] * (N // 8) + offs_n[None, :] // 8, mask=tile_mask, other=0)
        zeros = ((zero_words >> zero_shift[None, :]) & 0xF) + zero_offset
        scales = tl.load(scales_ptr + group[:, None] * N + offs_n[None, :], mask=tile_mask, other=0.0).to(tl.float32)
        w = (codes - zeros).to(tl.float32) * scales
        if HALF:  # float16 tiles go to the tensor cores as they are
            acc += tl.dot(x, w.to(tl.float16))
        elif IEEE:  # float32 activations: no TF32 rounding, so results match the float reference
            acc += tl.dot(x, w, input_precision="ieee")
        else:  # bfloat16 through a float32 (TF32) dot, see the module docstring
            acc += tl.dot(x.to(tl.float32), w)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


def int4_gptq_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                     g_idx: torch.Tensor, zero_offset: int = 1) -> torch.Tensor:
    """``x`` [..., K] times the GPTQ 4-bit weight [K, N]: [..., N] in ``x``'s dtype (no bias)."""
    K, N = qweight.shape[0] * 8, qweight.shape[1]
    if x.shape[-1] != K:
        raise ValueError(f"input has {x.shape[-1]} features, the int4 weight expects {K}")
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise TypeError("qweight and qzeros must be int32 (the GPTQ layout)")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return out.reshape(*lead, N)
    # tl.dot needs tiles of at least 16 on each side; decode (M = 1) pads its tile with masked rows
    block_m = 16 if M <= 16 else (32 if M <= 32 else 64)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, BLOCK_N))
    _int4_gptq_matmul[grid](
        x2, qweight.contiguous(), qzeros.contiguous(), scales.contiguous(), g_idx.to(torch.int32).contiguous(), out,
        M, N, K, zero_offset, x2.stride(0), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, HALF=x.dtype == torch.float16, IEEE=x.dtype == torch.float32,
    )
    return out.reshape(*lead, N)
