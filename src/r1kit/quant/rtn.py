"""The quantization grid (group scales and zero points) and round-to-nearest (RTN), GPTQ's baseline.

A group of weights maps to codes ``q = clamp(round(w / scale) + zero, 0, 2^bits − 1)`` and back to
``scale · (q − zero)``. Symmetric grids put the zero in the middle (8 for 4 bits); asymmetric ones
span [min, max] of the group (always including 0). Scales are rounded to fp16 before codes are
chosen, so the checkpoint (fp16 scales) reproduces exactly the weights the search saw.
This module must never look at activations: that is GPTQ's job.
"""

from __future__ import annotations

import dataclasses

import torch

from r1kit.quant.config import QuantConfig
from r1kit.quant.packing import default_g_idx, pack_gptq

FP16_TINY = 1e-7  # smallest scale kept: fp16 rounds it to a subnormal, never to 0


def grid_params(w: torch.Tensor, bits: int, sym: bool, mse: float = 0.0,
                weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale, zero) for ``w`` [rows, cols]: float scales (fp16-representable), integer-valued zeros.

    The grid spans the row's [min, max] (always including 0). With ``mse > 0`` the range is then
    shrunk to the one of :data:`SHRINKS` whose rounding error ``Σ weightsⱼ·|q(w) − w|^mse`` is
    least per row (clipping a few outliers buys finer steps for the rest; the reference and
    GPTQModel search the same grid with ``mse = 2.4``). ``weights`` [cols] (e.g. the Hessian
    diagonal) weigh each column's error; by default every column counts the same.
    Asymmetric zeros are kept in [1, 2^bits − 1] so that the v1 format's stored ``zero − 1`` fits.
    """
    maxq = 2**bits - 1
    w = w.float()
    xmin = w.min(dim=1).values.clamp(max=0)
    xmax = w.max(dim=1).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    flat = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(flat, -1.0, xmin), torch.where(flat, 1.0, xmax)
    if mse <= 0:
        return _grid(xmin, xmax, maxq, sym)
    best_err = torch.full_like(xmin, float("inf"))
    best_scale, best_zero = _grid(xmin, xmax, maxq, sym)
    for shrinks in SHRINKS.to(w.device).split(SHRINK_CHUNK):  # [k] candidates at once, memory bounded
        p = shrinks[:, None]
        scale, zero = _grid(p * xmin, p * xmax, maxq, sym)  # [k, rows]
        s, z = scale[..., None], zero[..., None]
        # |dequantized − w|^mse for every candidate, [k, rows, cols], in place: this search is most of GPTQ's time
        err = torch.div(w, s).round_().add_(z).clamp_(0, maxq).sub_(z).mul_(s).sub_(w).abs_().pow_(mse)
        err = err.sum(-1) if weights is None else err @ weights.float()
        k = err.argmin(dim=0)
        err = err.gather(0, k[None])[0]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        rows = torch.arange(len(k), device=w.device)
        best_scale = torch.where(better, scale[k, rows], best_scale)
        best_zero = torch.where(better, zero[k, rows], best_zero)
    return best_scale, best_zero


SHRINKS = 1 - torch.arange(80) / 100  # range shrink factors tried by the clipping search: 1.00, 0.99, … 0.21
SHRINK_CHUNK = 16


def _grid(xmin: torch.Tensor, xmax: torch.Tensor, maxq: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) spanning [xmin, xmax] in ``maxq`` steps; scales rounded to fp16 before zeros are chosen."""
    scale = ((xmax - xmin) / maxq).clamp_min(FP16_TINY).half().float()
    if sym:
        return scale, torch.full_like(scale, (maxq + 1) // 2)
    return scale, torch.round(-xmin / scale).clamp(1, maxq)


def to_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of ``w`` on the grid; ``scale``/``zero`` broadcast against ``w``."""
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


@dataclasses.dataclass
class QuantResult:
    """One quantized linear: codes [out, in], scales/zeros [G, out], g_idx [in]."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor

    def weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dequantized ``nn.Linear`` weight [out, in]."""
        g = self.g_idx.long()
        return (self.scales.t()[:, g] * (self.codes.float() - self.zeros.t()[:, g].float())).to(dtype)

    def split_rows(self, sizes: list[int]) -> list[QuantResult]:
        """The results of linears whose weights were stacked by rows (q/k/v sharing a Hessian), one each."""
        parts = zip(self.codes.split(sizes), self.scales.split(sizes, dim=1), self.zeros.split(sizes, dim=1))
        return [QuantResult(codes=c, scales=s, zeros=z, g_idx=self.g_idx.clone()) for c, s, z in parts]

    def pack(self, config: QuantConfig) -> dict[str, torch.Tensor]:
        return pack_gptq(self.codes.cpu(), self.zeros.cpu(), self.scales.cpu(), self.g_idx.cpu(), config.bits, config.zero_offset)


def quantize_rtn(weight: torch.Tensor, config: QuantConfig) -> QuantResult:
    """Round every weight to the nearest point of its group's grid (a partial last group has its own grid)."""
    size = config.group_for(weight.shape[1])
    codes, scales, zeros = [], [], []
    for w in weight.detach().float().split(size, dim=1):  # [out, size] per group, the last maybe narrower
        scale, zero = grid_params(w, config.bits, config.sym)
        codes.append(to_codes(w, scale[:, None], zero[:, None], config.bits))
        scales.append(scale)
        zeros.append(zero)
    return QuantResult(
        codes=torch.cat(codes, dim=1).to(torch.int32),
        scales=torch.stack(scales),
        zeros=torch.stack(zeros).to(torch.int32),
        g_idx=default_g_idx(weight.shape[1], size, device=weight.device),
    )
