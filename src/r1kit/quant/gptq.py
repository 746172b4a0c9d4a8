"""GPTQ (Frantar et al., 2022) for one linear layer: quantize columns one at a time and push each
column's rounding error onto the columns not yet quantized, weighted by the inverse Hessian of the
layer's inputs (``H = 2/n · Σ x xᵀ``), so the layer's *outputs* move as little as possible.

Steps: accumulate H from calibration inputs (:meth:`GPTQ.add_batch`); dampen its diagonal; take the
upper Cholesky factor of H⁻¹; sweep columns in lazy blocks (updates inside a block of 128 columns,
one matrix product for the rest); optional act-order (columns by decreasing H diagonal). Group
scales and zeros are chosen when the sweep reaches a group's first column, from the weights as
updated so far. Device-agnostic: everything runs where the layer's weight lives.
This module quantizes one matrix; it must never walk a model (see :mod:`r1kit.quant.quantizer`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from r1kit.errors import ConfigError
from r1kit.quant.config import QuantConfig
from r1kit.quant.rtn import QuantResult, grid_params, to_codes


class GPTQ:
    """Hessian accumulator and quantizer for one ``nn.Linear``."""

    def __init__(self, linear: nn.Linear) -> None:
        self.linear = linear
        cols = linear.in_features
        self.H: torch.Tensor | None = torch.zeros(cols, cols, device=linear.weight.device, dtype=torch.float32)
        self.nsamples = 0
        self.error: float | None = None  # GPTQ's own estimate Σ (w − q)² / [H⁻¹]ᵢᵢ² / 2, for the log

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor) -> None:
        """Fold a batch of the layer's inputs ([..., in_features]) into the running mean of 2·x xᵀ."""
        assert self.H is not None, "add_batch after quantize"
        x = x.reshape(-1, x.shape[-1]).float()
        n = x.shape[0]
        self.H *= self.nsamples / (self.nsamples + n)
        self.nsamples += n
        x = x * math.sqrt(2 / self.nsamples)
        self.H += x.t() @ x

    @torch.no_grad()
    def quantize(self, config: QuantConfig) -> QuantResult:
        """Quantize the layer's weight; the layer then holds the dequantized weight (its outputs feed on)."""
        if self.H is None or self.nsamples == 0:
            raise ConfigError("GPTQ saw no calibration inputs for this layer; check the calibration data")
        weight = self.linear.weight
        W = weight.detach().float().clone()
        rows, cols = W.shape
        size = config.group_for(cols)
        H, self.H = self.H, None
        dead = torch.diag(H) == 0  # inputs that were always 0: their weights do not matter
        H[dead, dead] = 1
        W[:, dead] = 0
        perm = torch.argsort(torch.diag(H), descending=True) if config.desc_act else None
        if perm is not None:
            W, H = W[:, perm], H[perm][:, perm]
        Hinv = _inverse_cholesky(H, config.damp_percent)

        codes = torch.zeros_like(W)
        scales, zeros = [], []
        losses = torch.zeros(rows, device=W.device)
        scale = zero = None
        bs = config.block_size
        for i1 in range(0, cols, bs):
            i2 = min(i1 + bs, cols)
            W1 = W[:, i1:i2].clone()
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            for i in range(i2 - i1):
                col = i1 + i
                # a new group: its grid from the weights as updated so far (a partial last group: from what is left)
                if col % size == 0:
                    ahead = torch.cat((W1[:, i:], W[:, i2:]), dim=1)[:, :size]
                    scale, zero = grid_params(ahead, config.bits, config.sym)
                    scales.append(scale)
                    zeros.append(zero)
                w = W1[:, i]
                d = Hinv1[i, i]
                q = to_codes(w, scale, zero, config.bits)
                codes[:, col] = q
                err = (w - scale * (q - zero)) / d
                losses += err**2 / 2
                W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
                Err1[:, i] = err
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
        self.error = float(losses.sum())

        g_idx = torch.arange(cols, device=W.device) // size  # group of each column in sweep order
        if perm is not None:
            inv = torch.argsort(perm)
            codes, g_idx = codes[:, inv], g_idx[inv]
        result = QuantResult(
            codes=codes.to(torch.int32),
            scales=torch.stack(scales),
            zeros=torch.stack(zeros).to(torch.int32),
            g_idx=g_idx.to(torch.int32),
        )
        weight.data.copy_(result.weight(weight.dtype))
        return result


def _inverse_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹, λ = damp · mean(diag H); more damping if H is not positive definite."""
    eye = torch.eye(H.shape[0], device=H.device, dtype=H.dtype)
    mean = torch.diag(H).mean()
    for attempt in range(5):
        lam = max(damp, 1e-6) * (10**attempt) * mean
        L, info = torch.linalg.cholesky_ex(H + lam * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U
    raise ConfigError("the calibration Hessian is not positive definite even with 10⁴× damping; use more calibration samples or a larger --damp")
