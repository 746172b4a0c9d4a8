"""The one seam between the model and whatever runs it: the cache protocol its attention layers use,
and the contiguous cache of the reference path.

The model never allocates cache memory itself: it is handed an object with the :class:`KVCacheView`
protocol and calls nothing on it that the protocol does not declare. :class:`ContiguousKVCache` is
the simple one (one tensor per layer, a batch that shares positions) used by ``r1kit generate`` and
by tests; the engine's paged views live in ``r1kit.infer.paged_cache``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from r1kit.config import ModelConfig
from r1kit.model.attention import compressed_global_attention, global_attention, local_attention


@runtime_checkable
class KVCacheView(Protocol):
    """What one forward of the model asks of its cache.

    Call order, per forward: :meth:`next_positions` (unless the caller gave positions); then for
    each layer in order either one :meth:`rope_store_attend` that returns a tensor, or
    :meth:`update` followed, for a hybrid layer, by :meth:`attend_hybrid`, and where that returns None
    (or for any other layer) by :meth:`attend` once per branch, for that same layer, with what
    ``update`` returned; finally :meth:`advance`. A view may hold keys between a layer's ``update``
    and its ``attend``, and asserts that they belong to the layer ``attend`` names.

    Two calls offer a faster path and may decline it by returning None: :meth:`rope_store_attend`
    (rotary, store and attention of a layer in one call) and :meth:`attend_hybrid` (a hybrid layer's
    two branches mixed in the cache). A view with no such path implements them as ``return None``.
    """

    window: int
    """The local window the model takes for this forward when the caller gives none (masks may use per-row windows)."""

    def next_positions(self, m: int, device: torch.device) -> torch.Tensor:
        """The positions of this forward's ``m`` new tokens: [m], or [B, m] where rows differ."""
        ...

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store layer ``layer_idx``'s new keys/values ([B, Hkv, m, D], rotated) and return the
        keys/values that layer's :meth:`attend` takes."""
        ...

    def attend(self, layer_idx: int, kind: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention of ``kind`` (``global``, ``local`` or ``compressed``, a hybrid's compressed global
        branch) of ``q`` [B, H, m, D] over ``k``/``v`` as :meth:`update` returned them for
        ``layer_idx``; [B, H, m, D]. A cache that cannot compute a kind raises ConfigError."""
        ...

    def rope_store_attend(self, layer_idx: int, kind: str, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          num_heads: int) -> torch.Tensor | None:
        """The rotary embedding, :meth:`update` and :meth:`attend` of a ``global`` or ``local``
        layer in one call, from one product's q/k/v ([B, m, (Hq + 2·Hkv)·D], heads in q, k, v
        order, before rotation): [B, m, Hq·D]. None where the cache has no such call for this
        step: the layer then takes the two-call path (nothing has been stored)."""
        ...

    def attend_hybrid(self, layer_idx: int, branch: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                      threshold: float | None) -> torch.Tensor | None:
        """A hybrid layer's whole attention after its :meth:`update`: the local branch and the global
        one (``branch``: ``global`` or ``compressed``) mixed as ``g·local + (1−g)·global`` with ``g``
        [B, 1 or H, m, 1]; under a ``threshold`` the tokens
        :func:`~r1kit.model.attention.hard_gate_local` sends to the local branch get it alone, their
        global work skipped. [B, H, m, D], or None where the view has no such call for this step: the
        layer then asks :meth:`attend` for each branch and mixes them itself (the reference)."""
        ...

    def advance(self, tokens: int) -> None:
        """The forward's ``tokens`` new positions are all stored."""
        ...


class ContiguousKVCache:
    """Per-layer growing K/V tensors for a batch of sequences that share positions.

    Local layers keep only their last ``window`` positions (the only ones a future query can see);
    global and hybrid layers keep everything. ``window`` is fixed for the life of the cache, so a
    cached decode sees the same window as one full forward over the same tokens. Attention is the
    model's own eager functions, whose alignment rule (queries are the last positions of the keys)
    holds for a batch that shares positions.
    """

    def __init__(self, config: ModelConfig, window: int) -> None:
        if not 1 <= window <= config.max_local_window:
            raise ValueError(f"window={window} must be in [1, max_local_window={config.max_local_window}]")
        self.window = window
        self.compress_block = config.hybrid_compress_block
        self.keep = [window if kind == "local" else None for kind in config.attention]
        self.keys: list[torch.Tensor | None] = [None] * config.num_layers
        self.values: list[torch.Tensor | None] = [None] * config.num_layers
        self.length = 0  # positions seen so far; the next token's position

    def next_positions(self, m: int, device: torch.device) -> torch.Tensor:
        return torch.arange(self.length, self.length + m, device=device)

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        old_k, old_v = self.keys[layer_idx], self.values[layer_idx]
        if old_k is not None:
            k, v = torch.cat((old_k, k), dim=2), torch.cat((old_v, v), dim=2)
        keep = self.keep[layer_idx]
        self.keys[layer_idx] = k if keep is None else k[:, :, -keep:]
        self.values[layer_idx] = v if keep is None else v[:, :, -keep:]
        return k, v

    def attend(self, layer_idx: int, kind: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if kind == "local":
            return local_attention(q, k, v, self.window)
        if kind == "compressed":
            return compressed_global_attention(q, k, v, self.compress_block)
        return global_attention(q, k, v)

    def rope_store_attend(self, layer_idx: int, kind: str, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          num_heads: int) -> None:
        """None: no fused kernel here (see :meth:`KVCacheView.rope_store_attend`)."""
        return None

    def attend_hybrid(self, layer_idx: int, branch: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                      threshold: float | None) -> None:
        """None: the layer mixes the branches itself (see :meth:`KVCacheView.attend_hybrid`)."""
        return None

    def advance(self, tokens: int) -> None:
        self.length += tokens

    def stored_positions(self, layer_idx: int) -> int:
        """How many positions layer ``layer_idx`` holds (a local layer never more than its window)."""
        k = self.keys[layer_idx]
        return 0 if k is None else k.shape[2]
