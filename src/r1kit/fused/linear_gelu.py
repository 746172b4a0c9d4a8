"""A GELU FFN's up projection with its activation as the matmul's epilogue (Triton): ``gelu(x · Wᵀ)``.

The guide (§4.1) asks for "LayerNorm + GELU in one kernel". In a pre-norm block the two are
separated by the up projection: ``gelu(up(LayerNorm(h)))``, and the matmul needs every feature of
a row normalised before it can start its sum. So r1kit fuses each with its neighbour instead: the
LayerNorm with the residual add before it (:mod:`r1kit.fused.residual_norm`), and the GELU with the
matmul before it, here: each output tile is activated in registers as it leaves the accumulator,
so the pre-activation is never read back (written only when a backward needs it). The backward is
eager's: ``gelu'`` on the kept pre-activation, then two matmuls (cuBLAS does those better than a
hand-written kernel would).

Tiles: float32 inputs take an IEEE float32 dot (results match a float32 reference to summation
order); float16 and bfloat16 inputs multiply in their dtype, accumulating in float32. Triton's CPU
interpreter computes bfloat16 dots wrongly, so the tests check the half-precision path in float16
there; on a GPU the self-check covers bfloat16. Runs on CUDA, and under the interpreter for the tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _linear_gelu(
    x_ptr, w_ptr, y_ptr, u_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    IEEE: tl.constexpr, STORE_U: tl.constexpr,
):
    # grouped launch order: GROUP_M row-tiles share each column-tile of W while it is in L2
    pid = tl.program_id(0)
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * tiles_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % group_size
    pid_n = (pid % (GROUP_M * tiles_n)) // group_size
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m, mask_n = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        a = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + k[None, :], mask=mask_m[:, None] & (k[None, :] < K), other=0.0)
        b = tl.load(w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + k[:, None], mask=mask_n[None, :] & (k[:, None] < K), other=0.0)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    out = offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if STORE_U:
        tl.store(u_ptr + out, acc.to(u_ptr.dtype.element_ty), mask=mask)
    # 0.5·u·(1 + tanh(z)) = u·σ(2z), z = √(2/π)·(u + 0.044715·u³); 2·√(2/π) written out (a jit
    # kernel reads no Python globals)
    y = acc * tl.sigmoid(1.5957691216057308 * (acc + 0.044715 * acc * acc * acc))
    tl.store(y_ptr + out, y.to(y_ptr.dtype.element_ty), mask=mask)


def _tiles(M: int, dtype: torch.dtype) -> dict:
    """The launch shape: a 16-row tile (the smallest ``tl.dot`` takes) for a decode step's few rows,
    large tiles otherwise; fewer pipeline stages for float32, whose tiles are twice the bytes."""
    if M <= 16:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64 if dtype != torch.float32 else 32, num_warps=8, num_stages=3)


def _launch(x2: torch.Tensor, weight: torch.Tensor, store_u: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    M, K = x2.shape
    N = weight.shape[0]
    y = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    u = torch.empty_like(y) if store_u else None
    if M and N:
        tiles = _tiles(M, x2.dtype)
        grid = (triton.cdiv(M, tiles["BLOCK_M"]) * triton.cdiv(N, tiles["BLOCK_N"]),)
        _linear_gelu[grid](x2, weight, y, y if u is None else u, M, N, K, x2.stride(0), weight.stride(0), y.stride(0),
                           GROUP_M=8, IEEE=x2.dtype == torch.float32, STORE_U=store_u, **tiles)
    return y, u


class LinearGELU(torch.autograd.Function):
    """:func:`linear_gelu` with eager's backward over the kept pre-activation."""

    @staticmethod
    def forward(ctx, x, weight):
        if x.shape[-1] != weight.shape[-1] or weight.dim() != 2:
            raise ValueError(f"linear_gelu: x {tuple(x.shape)} does not multiply a weight {tuple(weight.shape)} of [out, in] features")
        if x.dtype != weight.dtype:
            raise TypeError(f"linear_gelu: x is {x.dtype} and the weight {weight.dtype}; cast them to one dtype")
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        weight = weight.contiguous()
        y, u = _launch(x2, weight, store_u=ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        ctx.save_for_backward(x2, weight, u)
        ctx.shape = x.shape
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, weight, u = ctx.saved_tensors
        du = torch.ops.aten.gelu_backward(dy.reshape(u.shape), u, approximate="tanh")
        dx = du @ weight if ctx.needs_input_grad[0] else None
        dw = du.t() @ x2 if ctx.needs_input_grad[1] else None
        return None if dx is None else dx.reshape(ctx.shape), dw


def linear_gelu(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``gelu(x · weightᵀ)`` (tanh approximation) as :func:`r1kit.fused.reference.linear_gelu`
    computes it; ``x`` [..., K] and ``weight`` [N, K] of one dtype; differentiable in both."""
    return LinearGELU.apply(x, weight)

