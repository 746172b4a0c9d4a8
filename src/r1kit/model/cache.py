"""The cache interface the model's attention layers use, and the contiguous cache of the reference path.

The model never allocates cache memory itself: it is handed an object with the :class:`KVCacheView`
protocol. :class:`ContiguousKVCache` is the simple one (one tensor per layer, a batch that shares
positions) used by ``r1kit generate`` and by tests; the engine's paged cache lives in ``r1kit.infer``.
"""

from __future__ import annotations

from typing import Protocol

import torch

from r1kit.config import ModelConfig


class KVCacheView(Protocol):
    """Append a step's keys/values for one layer and return the keys/values that layer attends to;
    the last ``m`` positions of what is returned are the ones just appended.

    A cache for a batch of sequences at different positions (the engine's) also has
    ``attend(kind, q, k, v) -> out``: it computes the attention of ``kind`` ("global" or "local")
    itself, since only it knows each row's positions, window and padding; layers then only project
    and mix branches. It may also have ``rope_store_attend(layer_idx, kind, qkv, cos, sin, num_heads)
    -> out or None``: the rotary embedding, ``update`` and ``attend`` of a fused q/k/v projection's
    output in one call (the engine's decode steps on the CPU); None sends the layer the long way."""

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class ContiguousKVCache:
    """Per-layer growing K/V tensors for a batch of sequences that share positions.

    Local layers keep only their last ``window`` positions (the only ones a future query can see);
    global and hybrid layers keep everything. ``window`` is fixed for the life of the cache, so a
    cached decode sees the same window as one full forward over the same tokens.
    """

    def __init__(self, config: ModelConfig, window: int) -> None:
        if not 1 <= window <= config.max_local_window:
            raise ValueError(f"window={window} must be in [1, max_local_window={config.max_local_window}]")
        self.window = window
        self.keep = [window if kind == "local" else None for kind in config.attention]
        self.keys: list[torch.Tensor | None] = [None] * config.num_layers
        self.values: list[torch.Tensor | None] = [None] * config.num_layers
        self.length = 0  # positions seen so far; the next token's position

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        old_k, old_v = self.keys[layer_idx], self.values[layer_idx]
        if old_k is not None:
            k, v = torch.cat((old_k, k), dim=2), torch.cat((old_v, v), dim=2)
        keep = self.keep[layer_idx]
        self.keys[layer_idx] = k if keep is None else k[:, :, -keep:]
        self.values[layer_idx] = v if keep is None else v[:, :, -keep:]
        return k, v

    def advance(self, tokens: int) -> None:
        self.length += tokens

    def stored_positions(self, layer_idx: int) -> int:
        """How many positions layer ``layer_idx`` holds (a local layer never more than its window)."""
        k = self.keys[layer_idx]
        return 0 if k is None else k.shape[2]
