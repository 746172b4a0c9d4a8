"""Attention over packed rows: several documents side by side in one row, none seeing another.

SFT packs short conversations into full rows; each document restarts its positions at 0 (its rotary
phases are those of the document alone) and its tokens attend only to earlier tokens of the same
document: a block-diagonal causal mask (with a local layer's window inside each block). The model
needs no change for this: it is handed a :class:`DocumentAttention` as its
:class:`~r1kit.model.cache.KVCacheView`, which stores nothing and masks every attention call by the
row's document ids. Gradients flow through it as through the model's own attention.
"""

from __future__ import annotations

import torch

from r1kit.errors import ConfigError
from r1kit.model.attention import sdpa, window_mask


class DocumentAttention:
    """A cache view for one forward of packed rows. ``documents``: [B, T] document id of each token
    (ids ascend along a row; -1 marks padding, which sees only itself); ``positions``: [B, T], each
    document's own positions from 0; ``window``: the local layers' window."""

    def __init__(self, documents: torch.Tensor, positions: torch.Tensor, window: int) -> None:
        if documents.shape != positions.shape or documents.dim() != 2:
            raise ValueError(f"documents {tuple(documents.shape)} and positions {tuple(positions.shape)} must both be [batch, tokens]")
        self.window = window
        self.positions = positions
        t = documents.shape[1]
        index = torch.arange(t, device=documents.device)
        same = documents[:, :, None] == documents[:, None, :]
        causal = index[None, :, None] >= index[None, None, :]
        self.mask = (same & causal)[:, None]  # [B, 1, T, T]
        self.local_mask = self.mask & window_mask(positions[:, None, :, None], positions[:, None, None, :], window)

    def next_positions(self, m: int, device: torch.device) -> torch.Tensor:
        return self.positions

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return k, v

    def attend(self, layer_idx: int, kind: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if kind == "global":
            return sdpa(q, k, v, mask=self.mask)
        if kind == "local":
            return sdpa(q, k, v, mask=self.local_mask)
        raise ConfigError(f"packed sequences cannot use {kind} attention (hybrid_global=compressed); turn packing off (sft.packing: false)")

    def rope_store_attend(self, layer_idx, kind, qkv, cos, sin, num_heads) -> None:
        """None: the layers take the two-call path."""
        return

    def attend_hybrid(self, layer_idx, branch, q, k, v, g, threshold) -> None:
        """None: the layers mix a hybrid's branches themselves."""
        return

    def advance(self, tokens: int) -> None:
        """Nothing is stored, so nothing advances."""
