"""Rotary position embeddings (RoPE), with the long-context scalings Hugging Face checkpoints use.

The rotation is the Llama/Qwen2 "rotate half" layout (the first and second halves of each head are
the two coordinates of each pair), so imported checkpoints need no permutation. Frequencies are
computed in float32 whatever the model dtype: low-precision angles drift at long positions.
"""

from __future__ import annotations

import math

import torch

from r1kit.config import ModelConfig, RopeScaling


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> tuple[torch.Tensor, float]:
    """Return (inv_freq [head_dim/2], attention_scaling) for the config's RoPE flavour.

    ``attention_scaling`` multiplies cos/sin (YaRN's magnitude correction); it is 1 otherwise.
    ``dynamic`` (NTK) scaling depends on the sequence length and is applied in :func:`rope_cos_sin`.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None or scaling.type == "dynamic":
        return inv_freq.float(), 1.0
    if scaling.type == "linear":
        return (inv_freq / scaling.factor).float(), 1.0
    if scaling.type == "llama3":
        return _llama3(inv_freq, scaling).float(), 1.0
    return _yarn(head_dim, theta, scaling)


def _llama3(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    old = s.original_max_position_embeddings
    low_wavelen, high_wavelen = old / s.low_freq_factor, old / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(head_dim: int, theta: float, s: RopeScaling) -> tuple[torch.Tensor, float]:
    # YaRN (Peng et al. 2023): interpolate low frequencies, extrapolate high ones, ramp between.
    old = s.original_max_position_embeddings

    def dim_for(rotations: float) -> float:
        return (head_dim * math.log(old / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low = max(math.floor(dim_for(s.beta_fast)), 0)
    high = min(math.ceil(dim_for(s.beta_slow)), head_dim - 1)
    pos_freqs = theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (s.factor * pos_freqs)
    ramp = torch.clamp((torch.arange(head_dim // 2, dtype=torch.float64) - low) / max(high - low, 1e-3), 0, 1)
    extrapolation_weight = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    return inv_freq.float(), 0.1 * math.log(s.factor) + 1.0


class RotaryEmbedding(torch.nn.Module):
    """Computes cos/sin for arbitrary (possibly non-contiguous) positions; holds no learned state."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.theta = config.rope_theta
        self.scaling = config.rope_scaling
        self.max_seq_len = config.max_seq_len
        inv_freq, attention_scaling = inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.attention_scaling = attention_scaling

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [..., head_dim] for integer ``positions`` of any shape, in the form
        :func:`apply_rotary` takes: the first half of ``sin`` negated."""
        inv_freq = self.inv_freq
        if self.scaling is not None and self.scaling.type == "dynamic":
            inv_freq = self._dynamic_inv_freq(int(positions.max()) + 1).to(inv_freq.device)
        angles = positions.to(torch.float32)[..., None] * inv_freq
        cos, sin = angles.cos() * self.attention_scaling, angles.sin() * self.attention_scaling
        return torch.cat((cos, cos), dim=-1).to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)

    def _apply(self, fn, recurse=True):
        # a model cast (.to(bfloat16), .half()) must not round the frequencies: angles from rounded
        # frequencies drift further at every position (0.4% of a bf16 step is ~1 rad by position 1000).
        # Seen as integers for the cast, they move with the model and keep their bits.
        self.inv_freq = self.inv_freq.view(torch.int32)
        try:
            return super()._apply(fn, recurse)
        finally:
            self.inv_freq = self.inv_freq.view(torch.float32)

    def _dynamic_inv_freq(self, seq_len: int) -> torch.Tensor:
        # NTK-aware: beyond the trained length, raise the base so the lowest frequency still fits.
        if seq_len <= self.max_seq_len:
            return self.inv_freq
        factor = self.scaling.factor
        base = self.theta * ((factor * seq_len / self.max_seq_len) - (factor - 1)) ** (self.head_dim / (self.head_dim - 2))
        return inverse_frequencies(self.head_dim, base, None)[0]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [batch, heads, seq, head_dim] by cos/sin [seq, head_dim] or [batch, seq, head_dim]
    as :class:`RotaryEmbedding` returns them.

    Llama's ``x·cos + rotate_half(x)·sin`` with ``rotate_half(x) = (−x₂, x₁)``: the sign lives in
    ``sin`` (first half negated), so the rotation is one ``roll`` instead of slice, negate and concat
    (the same numbers; half the small ops, which count at decode)."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin
