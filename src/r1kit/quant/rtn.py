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


def grid_params(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale, zero) for ``w`` [rows, cols]: float scales (fp16-representable), integer-valued zeros.

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
    scale = ((xmax - xmin) / maxq).clamp_min(FP16_TINY).half().float()
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.round(-xmin / scale).clamp(1, maxq)
    return scale, zero


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
