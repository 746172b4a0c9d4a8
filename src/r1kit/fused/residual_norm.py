"""A residual add and the norm after it in one pass (Triton): ``h = x + delta``, ``y = norm(h)·w (+ b)``.

A pre-norm block adds each sublayer's output into the residual stream and normalises the sum for
the next sublayer: eagerly that is an add (read two rows, write one) and a norm (read it back, write
the normed row), and in backward as many passes again. Here one program per row reads ``x`` and
``delta`` once and writes both ``h`` and ``y`` (vLLM's ``fused_add_rms_norm``, Liger's and Unsloth's
kernels); the backward reads ``h`` once per row and writes ``dh`` (the gradient of ``x`` and of
``delta`` alike), adding the gradient that reaches ``h`` through the residual path. The norm is an
RMSNorm or a LayerNorm (the guide's §4.1 names LayerNorm), a compile-time switch of one kernel.
``delta`` may be absent: then it is the norm alone (a block's first norm).

Numbers: ``h`` is rounded to its dtype before it is normalised, as eager's add does; the statistics
and the affine transform are float32, rounded once into the output (eager's bfloat16 RMSNorm
rounds twice: before and after the weight). The weight's (and bias's) gradient is reduced in
float32, in per-program partial rows summed once at the end.
Runs on CUDA, and on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``) for the tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_norm_forward(
    x_ptr, delta_ptr, w_ptr, b_ptr, h_ptr, y_ptr, mean_ptr, rstd_ptr,
    D, stride_x, stride_delta, stride_h, stride_y, eps,
    BLOCK_D: tl.constexpr, RMS: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    h = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_DELTA:
        h = h + tl.load(delta_ptr + row * stride_delta + cols, mask=mask, other=0.0).to(tl.float32)
        stored = h.to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + row * stride_h + cols, stored, mask=mask)
        h = stored.to(tl.float32)  # normalise the residual as it is kept, as eager does
    if RMS:
        centered = h
    else:
        mean = tl.sum(h, axis=0) / D
        tl.store(mean_ptr + row, mean)
        centered = tl.where(mask, h - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / D + eps)
    tl.store(rstd_ptr + row, rstd)
    y = centered * rstd * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _add_norm_backward(
    dy_ptr, dh_out_ptr, h_ptr, w_ptr, mean_ptr, rstd_ptr, dh_ptr, dw_ptr, db_ptr,
    rows, D, rows_per_program, stride_dy, stride_dh_out, stride_h, stride_dh,
    BLOCK_D: tl.constexpr, RMS: tl.constexpr, HAS_DH_OUT: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_D,), dtype=tl.float32)
    db = tl.zeros((BLOCK_D,), dtype=tl.float32)
    start = pid.to(tl.int64) * rows_per_program  # 64-bit row offsets: rows × D may pass 2³¹
    for row in range(start, tl.minimum(start + rows_per_program, rows)):
        h = tl.load(h_ptr + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        if RMS:
            n = h * rstd
        else:
            n = tl.where(mask, (h - tl.load(mean_ptr + row)) * rstd, 0.0)
        dy = tl.load(dy_ptr + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        dn = dy * w
        # d/dh of n·w: rstd·(dn − n·mean(dn·n)), less mean(dn) for a LayerNorm (its mean moves with h)
        if RMS:
            dh = rstd * (dn - n * (tl.sum(dn * n, axis=0) / D))
        else:
            dh = rstd * (dn - tl.sum(dn, axis=0) / D - n * (tl.sum(dn * n, axis=0) / D))
        if HAS_DH_OUT:
            dh = dh + tl.load(dh_out_ptr + row * stride_dh_out + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(dh_ptr + row * stride_dh + cols, dh.to(dh_ptr.dtype.element_ty), mask=mask)
        dw += dy * n
        if HAS_BIAS:
            db += dy
    tl.store(dw_ptr + pid * D + cols, dw, mask=mask)
    if HAS_BIAS:
        tl.store(db_ptr + pid * D + cols, db, mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as [rows, D] with unit stride along D (a view where it can be one)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _launch_shape(D: int) -> tuple[int, int]:
    """(BLOCK_D, num_warps): a whole row in one block, more warps for wider rows."""
    block = triton.next_power_of_2(D)
    return block, min(16, max(1, block // 256))


def _programs(device: torch.device, rows: int) -> int:
    # each backward program sums its rows' weight gradient in registers: a few per multiprocessor
    # keeps the GPU busy while the partial sums stay few
    if device.type == "cuda":
        return max(1, min(rows, 4 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(rows, 4))


class AddNorm(torch.autograd.Function):
    """``(y, h)`` of :func:`add_norm` with its backward."""

    @staticmethod
    def forward(ctx, x, delta, weight, bias, eps: float, rms: bool):
        D = x.shape[-1]
        if weight.shape != (D,) or (bias is not None and bias.shape != (D,)):
            raise ValueError(f"the norm's weight {tuple(weight.shape)} and bias must have one value per feature of x {tuple(x.shape)}")
        if delta is not None and delta.shape != x.shape:
            raise ValueError(f"the residual x {tuple(x.shape)} and the sublayer's output {tuple(delta.shape)} must have one shape")
        h_dtype = x.dtype if delta is None else torch.promote_types(x.dtype, delta.dtype)
        x2 = _rows(x)
        d2 = x2 if delta is None else _rows(delta)
        rows = x2.shape[0]
        h = torch.empty((rows, D), dtype=h_dtype, device=x.device) if delta is not None else x2
        y = torch.empty((rows, D), dtype=torch.promote_types(h_dtype, weight.dtype), device=x.device)
        mean = torch.empty(rows, dtype=torch.float32, device=x.device)
        rstd = torch.empty_like(mean)
        block, warps = _launch_shape(D)
        if rows:
            _add_norm_forward[(rows,)](
                x2, d2, weight, weight if bias is None else bias, h, y, mean, rstd,
                D, x2.stride(0), d2.stride(0), h.stride(0), y.stride(0), eps,
                BLOCK_D=block, RMS=rms, HAS_DELTA=delta is not None, HAS_BIAS=bias is not None, num_warps=warps,
            )
        ctx.save_for_backward(h, weight, bias, mean, rstd)
        ctx.rms, ctx.shape, ctx.has_delta = rms, x.shape, delta is not None
        ctx.dtypes = (x.dtype, None if delta is None else delta.dtype)
        ctx.set_materialize_grads(False)
        y = y.reshape(x.shape)
        return y, (h.reshape(x.shape) if delta is not None else None)

    @staticmethod
    def backward(ctx, dy, dh_out):
        h, weight, bias, mean, rstd = ctx.saved_tensors
        rows, D = h.shape
        if dy is None:
            dy = torch.zeros(ctx.shape, dtype=h.dtype, device=h.device)
        dy2 = _rows(dy)
        dho = None if dh_out is None else _rows(dh_out)
        dh = torch.empty_like(h)
        programs = _programs(h.device, rows)
        dw = torch.empty((programs, D), dtype=torch.float32, device=h.device)
        db = torch.empty_like(dw) if bias is not None else dw
        block, warps = _launch_shape(D)
        if rows:
            _add_norm_backward[(programs,)](
                dy2, dy2 if dho is None else dho, h, weight, mean, rstd, dh, dw, db,
                rows, D, triton.cdiv(rows, programs), dy2.stride(0), 0 if dho is None else dho.stride(0), h.stride(0), dh.stride(0),
                BLOCK_D=block, RMS=ctx.rms, HAS_DH_OUT=dho is not None, HAS_BIAS=bias is not None, num_warps=warps,
            )
        else:
            dw.zero_()
            db.zero_()
        dh = dh.reshape(ctx.shape)
        x_dtype, delta_dtype = ctx.dtypes
        grad_weight = dw.sum(0).to(weight.dtype)
        grad_bias = None if bias is None else db.sum(0).to(bias.dtype)
        grad_delta = dh.to(delta_dtype) if ctx.has_delta else None
        return dh.to(x_dtype), grad_delta, grad_weight, grad_bias, None, None


def add_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
             eps: float, rms: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(y, h)``: ``h = x + delta`` (None without ``delta``) and ``y = norm(h)·weight (+ bias)``, an
    RMSNorm (``rms``) or a LayerNorm over the last dimension, as
    :func:`r1kit.fused.reference.add_norm` computes them, differentiable in every tensor."""
    return AddNorm.apply(x, delta, weight, bias, eps, rms)
