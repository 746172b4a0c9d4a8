"""GPTQ (Frantar et al., 2022) for one weight matrix: quantize columns one at a time and push each
column's rounding error onto the columns not yet quantized, weighted by the inverse Hessian of the
layer's inputs (``H = 2/n · Σ x xᵀ``), so the layer's *outputs* move as little as possible.

Steps: accumulate H from calibration inputs (:class:`Hessian`, one per distinct input: q/k/v share
theirs); zero the weights of dead inputs; order the columns (act-order: by decreasing H diagonal;
act-group-aware: groups by their largest diagonal, columns sorted inside each, so groups stay
contiguous); dampen H's diagonal (more where the Cholesky factorization fails); take the upper
Cholesky factor of H⁻¹ (in float64: it is small and the sweep divides by its diagonal); sweep the
columns in lazy blocks (rank-1 updates inside a block, one matrix product for the columns after it).
A group's scale and zero come from the weights as updated so far when the sweep reaches the group
(static groups: from the original weights, before the sweep), optionally with the clipping search
of :func:`r1kit.quant.rtn.grid_params`. Device-agnostic: everything runs where the weight lives.
This module quantizes one matrix; it must never walk a model (see :mod:`r1kit.quant.quantizer`).
"""

from __future__ import annotations

import torch

from r1kit.errors import ConfigError
from r1kit.quant.config import QuantConfig
from r1kit.quant.packing import group_count
from r1kit.quant.rtn import QuantResult, grid_params


class Hessian:
    """The running mean of ``2 x xᵀ`` over a linear's calibration inputs (float32, [in, in])."""

    def __init__(self, columns: int, device: torch.device | str) -> None:
        self.matrix = torch.zeros(columns, columns, device=device, dtype=torch.float32)
        self.nsamples = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        """Fold a batch of inputs ([..., in]) in: one matrix product, no copy of ``x`` beyond a cast."""
        x = x.reshape(-1, x.shape[-1]).float()
        n = x.shape[0]
        if n == 0:
            return
        total = self.nsamples + n
        self.matrix.addmm_(x.t(), x, beta=self.nsamples / total, alpha=2 / total)
        self.nsamples = total


@torch.no_grad()
def output_error(weight: torch.Tensor, quantized: torch.Tensor, H: torch.Tensor) -> float:
    """``‖X(W − Q)ᵀ‖² / ‖XWᵀ‖²`` on the calibration inputs, from their Hessian (``XᵀX = n/2 · H``)."""
    W, D = weight.float(), quantized.float() - weight.float()
    return float(((D @ H) * D).sum() / ((W @ H) * W).sum().clamp_min(1e-30))


def column_order(diag: torch.Tensor, config: QuantConfig, size: int) -> torch.Tensor | None:
    """The sweep's column order (``perm[k]`` = the column quantized k-th), or None for input order."""
    if config.desc_act:
        return torch.argsort(diag, descending=True, stable=True)
    if not config.act_group_aware:
        return None
    cols = diag.numel()
    groups = group_count(cols, size)
    padded = torch.full((groups * size,), -torch.inf, device=diag.device, dtype=diag.dtype)
    padded[:cols] = diag  # a partial last group: its padding sorts last and is dropped below
    values, inside = torch.sort(padded.view(groups, size), dim=1, descending=True, stable=True)
    by_group = torch.argsort(values[:, 0], descending=True, stable=True)
    perm = (inside + torch.arange(groups, device=diag.device)[:, None] * size)[by_group].flatten()
    return perm[perm < cols]


def inverse_cholesky(H: torch.Tensor, damp: float, increment: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + λI)⁻¹ with λ = damp · mean(diag H), and the damp it took:
    ``damp`` first, then ``damp + increment``, … while the factorization fails (GPTQModel's rule)."""
    H = H.double()
    mean = H.diagonal().mean()
    while True:
        damped = H.clone()
        damped.diagonal().add_(max(damp, 1e-8) * mean)
        L, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info) == 0:
                return U.float(), damp
        if increment <= 0 or damp + increment >= 1:
            raise ConfigError(
                f"the calibration Hessian is not positive definite even with damp={damp:.3f}; give more calibration "
                "samples (--nsamples, --seqlen) or a larger --damp"
            )
        damp += increment


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, H: torch.Tensor, config: QuantConfig) -> tuple[QuantResult, float]:
    """Quantize ``weight`` [out, in] against the Hessian ``H`` [in, in] of its inputs (left unchanged).

    Returns the codes, scales, zeros and ``g_idx`` (in the layer's input order) and the damp used.
    """
    W = weight.detach().float().clone()
    rows, cols = W.shape
    size = config.group_for(cols)
    groups = group_count(cols, size)
    maxq = 2**config.bits - 1
    diag = H.diagonal()
    dead = diag == 0  # inputs that were always 0: their weights do not matter
    H = H.clone()
    H.diagonal().masked_fill_(dead, 1.0)
    W.masked_fill_(dead[None, :], 0.0)
    g_idx = torch.arange(cols, device=W.device) // size  # each input column's group
    scales = torch.empty(groups, rows, device=W.device)
    zeros = torch.empty(groups, rows, device=W.device)
    if config.static_groups:
        for g, w in enumerate(W.split(size, dim=1)):
            scales[g], zeros[g] = grid_params(w, config.bits, config.sym, config.mse, _weights(H.diagonal(), g, size, config))
    perm = column_order(H.diagonal(), config, size)
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
        if config.desc_act and not config.static_groups:
            g_idx[perm] = g_idx.clone()  # dynamic act-order groups: runs of `size` columns in sweep order
    U, damp = inverse_cholesky(H, config.damp_percent, config.damp_auto_increment)
    sweep_groups = (g_idx if perm is None else g_idx[perm]).tolist()
    # where the sweep meets a group first and how many columns it has there (dynamic groups are contiguous in it)
    first = {} if config.static_groups else {g: k for k, g in reversed(list(enumerate(sweep_groups)))}
    counts = torch.bincount(g_idx, minlength=groups).tolist()
    codes = torch.empty(rows, cols, device=W.device)
    pivots = U.diagonal().tolist()
    current, bs = None, config.block_size
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        W1, U1 = W[:, i1:i2], U[i1:i2, i1:i2]  # views: the block's updates land in W itself
        Err1 = torch.empty(rows, i2 - i1, device=W.device)
        for i in range(i2 - i1):
            col = i1 + i
            g = sweep_groups[col]
            if first.get(g) == col:
                end = col + counts[g]
                span = W[:, col:end]
                if end > i2:  # the group runs past the block: bring its tail up to date with the block's updates so far
                    tail = torch.addmm(W[:, i2:end], Err1[:, :i], U[i1:col, i2:end], alpha=-1)
                    span = torch.cat((W1[:, i:], tail), dim=1)
                scales[g], zeros[g] = grid_params(span, config.bits, config.sym, config.mse, _weights(H.diagonal()[col:end], None, 0, config))
                current = None
            if g != current:
                current, scale, zero = g, scales[g], zeros[g]
            w = W1[:, i]
            q = torch.clamp_(torch.round(w / scale).add_(zero), 0, maxq)
            codes[:, col] = q
            err = Err1[:, i]
            torch.sub(w, q.sub_(zero).mul_(scale), out=err).div_(pivots[col])
            W1[:, i + 1 :].addr_(err, U1[i, i + 1 :], alpha=-1)
        W[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1)
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    result = QuantResult(codes=codes.to(torch.int32), scales=scales, zeros=zeros.to(torch.int32), g_idx=g_idx.to(torch.int32))
    return result, damp


def _weights(diag: torch.Tensor, g: int | None, size: int, config: QuantConfig) -> torch.Tensor | None:
    """The clipping search's column weights: the Hessian diagonal of the group's columns."""
    if config.mse <= 0:
        return None
    return diag if g is None else diag[g * size : (g + 1) * size]
