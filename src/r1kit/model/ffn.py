"""Feed-forward layers: the dense SwiGLU/GELU FFN and the seed's Top-K sparse FFN.

Top-K keeps, per token, the ``k = round((1 - sparsity) · ffn_size)`` neurons with the largest gate
activation magnitude |act(gate(x))| (for GELU, |gelu(up(x))|) and zeroes the rest.

* Training runs the masked dense computation. Gradients go straight through the mask by default
  (``topk_gradient: ste``, as Q-Sparse: the forward is sparse, the backward dense, so neurons that
  are off today still learn to come back); ``masked`` sends gradient only through kept neurons.
* Decoding a few tokens (``topk_gather_max_tokens``) takes the gather path: it reads only the kept
  rows of W_up and the kept rows of a row-major copy of W_downᵀ, so the work shrinks with sparsity.
  Masking inside dense matmuls would cut no FLOPs.

The layer never changes its own sparsity: :mod:`r1kit.model.sparsity` owns that decision. Outside
packages change how a layer computes by swapping it for a subclass that overrides one method
(:meth:`DenseFFN.project_gate_up`, :meth:`TopKFFN.keep`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from r1kit.config import ModelConfig


# Above this share of kept neurons, one dense read of W_up beats copying the kept rows out of it
# (a copy reads k·d, writes k·d and reads it again); measured by benchmarks/bench_ffn_decode.py.
DENSE_UP_ABOVE = 0.4


def _activation(name: str):
    return F.silu if name == "swiglu" else (lambda t: F.gelu(t, approximate="tanh"))


class DenseFFN(nn.Module):
    """SwiGLU (``down(silu(gate(x)) * up(x))``, Llama/Qwen2 layout) or GELU (``down(gelu(up(x)))``)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.gated = config.activation == "swiglu"
        if self.gated:
            self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)
        self.act = _activation(config.activation)
        self.dropout = nn.Dropout(config.dropout)

    def project_gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The gate and up projections of a SwiGLU FFN (a subclass may compute both in one product)."""
        return self.gate_proj(x), self.up_proj(x)

    def activations(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(selector, hidden): the activation whose magnitude ranks neurons, and the hidden state."""
        if self.gated:
            gate, up = self.project_gate_up(x)
            a = self.act(gate)
            return a, a * up
        h = self.act(self.up_proj(x))
        return h, h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.activations(x)[1]
        # nn.Dropout is the identity outside training: skip its call (a few µs per layer per decode step)
        return self.down_proj(self.dropout(h) if self.training else h)


class TopKFFN(DenseFFN):
    """The Top-K sparse FFN; ``sparsity`` is the fraction of neurons switched off for each token."""

    def __init__(self, config: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__(config)
        self.sparsity = config.sparsity_for(layer_idx)
        self.gradient = config.topk_gradient
        self.gather_max_tokens = config.topk_gather_max_tokens
        self.last_retained: torch.Tensor | None = None  # share of |activation| mass kept, for the controller
        self._down_t: torch.Tensor | None = None
        self._up_rows: torch.Tensor | None = None
        self._down_t_version: tuple[int, int] | None = None

    @property
    def k(self) -> int:
        f = self.down_proj.in_features
        return max(1, min(f, round((1.0 - self.sparsity) * f)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.numel() // x.shape[-1]
        if not isinstance(self.up_proj, nn.Linear):  # quantized (int4) weights have no rows to gather
            return self.forward_masked(x)
        if not self.training and not torch.is_grad_enabled() and tokens <= self.gather_max_tokens:
            return self.forward_gather(x)
        return self.forward_masked(x)

    def keep(self, magnitude: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mask, kept, total) for activation magnitudes [..., f]: the boolean mask of each token's
        top-``k`` neurons, and the |activation| mass the kept neurons and all neurons carry [...]."""
        # the k-th largest as a threshold: cheaper than topk indices + scatter on CPU (ties keep both)
        f = magnitude.shape[-1]
        mask = magnitude >= magnitude.kthvalue(f - self.k + 1, dim=-1, keepdim=True).values
        return mask, (magnitude * mask).sum(-1), magnitude.sum(-1)

    def forward_masked(self, x: torch.Tensor) -> torch.Tensor:
        """Dense compute, then zero all but the top-k neurons per token (training and prefill)."""
        selector, h = self.activations(x)
        mask, kept, total = self.keep(selector.detach().abs())
        mask = mask.to(h.dtype)
        if self.training:
            self.last_retained = (kept / total.clamp_min(1e-12)).mean().detach()
        if self.gradient == "ste" and self.training:
            sparse = h + (h * mask - h).detach()
        else:
            sparse = h * mask
        return self.down_proj(self.dropout(sparse))

    def forward_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Compute only the kept neurons: W_up's kept rows (or all of W_up at low sparsity, where
        copying rows costs more than reading them) and k rows of W_downᵀ per token."""
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        down_t = self._transposed_down()
        k, f = self.k, self.down_proj.in_features
        out = torch.empty_like(x2)
        for i in range(x2.shape[0]):  # a handful of tokens: one gathered matrix-vector product each
            row = x2[i : i + 1]  # stays 2-D: 1-D bf16 inputs take a much slower kernel
            if self.gated:
                a = self.act(self.gate_proj(row))[0]  # read whole to rank neurons (may be a packed kernel)
                idx = a.abs().topk(k, sorted=False).indices
                if k > DENSE_UP_ABOVE * f:
                    h = a[idx] * F.linear(row, self.up_proj.weight)[0][idx]
                else:
                    idx = idx.sort().values  # ascending rows read W_up front to back
                    h = a[idx] * F.linear(row, torch.index_select(self.up_proj.weight, 0, idx, out=self._row_buffer(k, x)))[0]
            else:  # GELU ranks by the hidden state itself: only W_down's reads shrink
                a = self.act(self.up_proj(row))[0]
                idx = a.abs().topk(k, sorted=False).indices
                h = a[idx]
            # sum_i h_i · W_downᵀ[idx_i] in one pass over the k selected rows, without copying them
            out[i] = F.embedding_bag(idx[None], down_t, per_sample_weights=h[None], mode="sum")[0]
        return out.reshape(shape)

    def _row_buffer(self, k: int, like: torch.Tensor) -> torch.Tensor:
        # Reused across steps: a fresh buffer this large is mmap'd and page-faulted on every call.
        buf = self._up_rows
        if buf is None or buf.shape[0] != k or buf.dtype != like.dtype or buf.device != like.device or buf.is_inference() != torch.is_inference_mode_enabled():
            buf = self._up_rows = torch.empty(k, like.shape[-1], dtype=like.dtype, device=like.device)
        return buf

    def _transposed_down(self) -> torch.Tensor:
        # A row-major W_downᵀ makes the kept neurons' weights contiguous rows; rebuilt if weights change.
        weight = self.down_proj.weight
        version = (weight.data_ptr(), -1 if weight.is_inference() else weight._version)  # inference tensors have no version
        if self._down_t is None or self._down_t_version != version or self._down_t.dtype != weight.dtype:
            self._down_t = weight.detach().t().contiguous()
            self._down_t_version = version
        return self._down_t


def build_ffn(config: ModelConfig, layer_idx: int) -> DenseFFN:
    return TopKFFN(config, layer_idx) if config.ffn[layer_idx] == "topk" else DenseFFN(config)
