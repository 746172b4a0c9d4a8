"""Attention: global (causal, GQA), local (sliding window, O(n·w)) and the seed's hybrid (DHA).

Every function here takes queries for the *last* ``m`` positions of the keys it is given
(``q``: [B, H, m, D], ``k``/``v``: [B, Hkv, n, D], n >= m): that one alignment rule covers a full
forward (m = n), a cached decode step (m = 1) and a chunked prefill over a cache. The attention
module never owns cache memory: it is handed a cache view and asks it for the keys to attend to.

Fast paths are applied from outside by swapping a layer for a subclass that overrides one small
method (:meth:`Attention.project_qkv`, :meth:`Attention.mix_weight`); this module knows none of them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from r1kit.config import ModelConfig
from r1kit.model.rope import apply_rotary

if TYPE_CHECKING:
    from r1kit.model.cache import KVCacheView


def window_start(position, window: int):
    """The first key position a query at ``position`` of a local layer with ``window`` sees: it sees
    ``[window_start, position]``, the ``window`` positions ending at itself (fewer near the start).

    The one statement of the local-window rule: the eager functions below, the engine's paged masks
    and the ``lowest`` its decode kernels read from all come from here. ``position``: an int or a
    tensor (element-wise); ``window``: an int or a tensor that broadcasts with it."""
    start = position - window + 1
    return start.clamp_min(0) if isinstance(start, torch.Tensor) else max(0, start)


def window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window) -> torch.Tensor:
    """Boolean (broadcast of ``q_pos`` and ``k_pos``): the query at ``q_pos`` of a local layer sees the key at ``k_pos``."""
    return (k_pos <= q_pos) & (k_pos >= window_start(q_pos, window))


def hard_gate_local(g: torch.Tensor, threshold: float) -> torch.Tensor:
    """The hard gate's rule, [B, 1, m, 1] boolean from a hybrid's gate ``g`` [B, 1 or H, m, 1]: a token
    whose gate is >= ``threshold`` in every head takes the local branch alone; the others mix both.
    The eager path, the reference cache and the engine's paged views all decide by it."""
    return (g >= threshold).all(dim=1, keepdim=True)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
    """Scaled dot-product attention, GQA when K/V have fewer heads than Q (query head ``h`` reads
    K/V head ``h // (H / Hkv)``)."""
    gqa = q.shape[1] != k.shape[1]
    if gqa and fused_gqa_unsupported(q.device.type, q.dtype, mask is not None):
        k, v = repeat_kv(k, q.shape[1] // k.shape[1]), repeat_kv(v, q.shape[1] // v.shape[1])
        gqa = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)


def fused_gqa_unsupported(device_type: str, dtype: torch.dtype, masked: bool) -> bool:
    """On CUDA only flash attention reads fewer K/V heads than queries, and it takes neither a mask nor
    float32: there ``enable_gqa`` silently falls back to the unfused math kernel, which materialises
    every score (O(n²) memory, several launches). Repeating K/V first lets the memory-efficient kernel
    run instead. The CPU's fused kernel takes GQA with masks and float32 alike."""
    return device_type == "cuda" and (masked or dtype == torch.float32)


def repeat_kv(t: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hkv, n, D] -> [B, Hkv·groups, n, D], each K/V head repeated for its group of query heads."""
    b, h, n, d = t.shape
    return t[:, :, None].expand(b, h, groups, n, d).reshape(b, h * groups, n, d)


def global_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of the last ``m`` positions over all ``n`` keys (GQA through SDPA)."""
    m, n = q.shape[2], k.shape[2]
    if m == n:
        return sdpa(q, k, v, causal=True)
    if m == 1:  # a decode step sees every cached key
        return sdpa(q, k, v)
    offset = n - m
    mask = torch.arange(n, device=q.device)[None, :] <= torch.arange(m, device=q.device)[:, None] + offset
    return sdpa(q, k, v, mask=mask)


def _window_mask(m: int, n: int, window: int, device: torch.device) -> torch.Tensor:
    """[m, n] boolean: which of the ``n`` keys each of the last ``m`` queries sees."""
    return window_mask(torch.arange(n - m, n, device=device)[:, None], torch.arange(n, device=device)[None, :], window)


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """Causal sliding-window attention: each query sees itself and the ``window - 1`` keys before it.

    Work grows as O(n·w): queries are cut into blocks, and each block attends only to the keys its
    window can reach (about w + block of them), never to an (n, n) score matrix.
    """
    m = q.shape[2]
    first = window_start(k.shape[2] - m, window)  # the first query's first key: no query sees an earlier one
    k, v = k[:, :, first:], v[:, :, first:]
    n = k.shape[2]
    if n <= window:  # the window covers every key: plain causal attention
        return global_attention(q, k, v)
    if m <= window:  # a few queries (decode, short chunk): one masked call over <= m + w - 1 keys
        return sdpa(q, k, v, mask=_window_mask(m, n, window, q.device))
    if n > m:  # align queries with keys by padding the front; the padded rows are dropped below
        q = F.pad(q, (0, 0, n - m, 0))
    return _blocked_local(q, k, v, window)[:, :, n - m :]


def _blocked_local(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    # The first `window` queries are plain causal attention. The rest go in blocks of `block`
    # queries, each attending to the `window + block - 1` keys that can reach it, taken as
    # overlapping views of K/V; all blocks share one [block, span] mask. Small blocks keep the
    # wasted (masked) work near w·block instead of the w·w a block of w queries would waste.
    batch, heads, n, dim = q.shape
    kv_heads = k.shape[1]
    block = min(window, max(64, window // 16))
    head = sdpa(q[:, :, :window], k[:, :, :window], v[:, :, :window], causal=True)
    tail = n - window
    blocks = -(-tail // block)
    pad = blocks * block - tail
    span = window + block - 1
    qt = F.pad(q[:, :, window:], (0, 0, 0, pad)).view(batch, heads, blocks, block, dim).transpose(1, 2).reshape(batch * blocks, heads, block, dim)

    def spans(t: torch.Tensor) -> torch.Tensor:  # block i's keys start at position i·block + 1
        t = F.pad(t[:, :, 1:], (0, 0, 0, pad)).unfold(2, span, block)
        return t.permute(0, 2, 1, 4, 3).reshape(batch * blocks, kv_heads, span, dim)

    # a block's query row r sits window - 1 positions after its key column r
    row = torch.arange(block, device=q.device)[:, None]
    col = torch.arange(span, device=q.device)[None, :]
    out = sdpa(qt, spans(k), spans(v), mask=window_mask(row + window - 1, col, window))
    out = out.view(batch, blocks, heads, block, dim).transpose(1, 2).reshape(batch, heads, blocks * block, dim)[:, :, :tail]
    return torch.cat((head, out), dim=2)


def compressed_global_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int) -> torch.Tensor:
    """Global attention over mean-pooled key/value blocks (the compressed branch of DeepSeek's NSA).

    Keys and values are averaged over non-overlapping blocks of ``block`` tokens; a query sees the
    blocks that end at or before it. Cost O(n²/block) instead of O(n²). Queries before the first
    complete block see nothing here and get zeros (the hybrid's local branch covers them).
    """
    m, n = q.shape[2], k.shape[2]
    blocks = n // block
    out = q.new_zeros(q.shape)
    if blocks == 0:
        return out
    pooled_k = k[:, :, : blocks * block].unflatten(2, (blocks, block)).mean(dim=3)
    pooled_v = v[:, :, : blocks * block].unflatten(2, (blocks, block)).mean(dim=3)
    query_pos = torch.arange(m, device=q.device)[:, None] + (n - m)
    block_end = torch.arange(1, blocks + 1, device=q.device)[None, :] * block - 1
    mask = block_end <= query_pos  # [m, blocks]
    sees_any = mask.any(dim=1)
    if not bool(sees_any.any()):
        return out
    rows = sees_any.nonzero().squeeze(1)
    out[:, :, rows] = sdpa(q[:, :, rows], pooled_k, pooled_v, mask=mask[rows])
    return out


class Attention(nn.Module):
    """One attention layer of kind ``global``, ``local`` or ``hybrid``.

    Q/K/V are projected once; in a hybrid layer both branches share them and a gate network (the
    seed's Linear d→d/4, SiLU, Linear→1 or →heads, sigmoid) mixes ``g·local + (1−g)·global`` per
    token. The hybrid can skip work in three ways, all config fields: its global branch may run over
    compressed blocks (``hybrid_global: compressed``); at inference a hard gate
    (``hybrid_gate_threshold``) drops the global branch for tokens whose gate is above the
    threshold; and per-layer patterns put hybrid layers only where wanted.

    Without a cache the layer computes attention itself (training, a full forward); with one it
    hands the cache its keys (``update``) and asks it for the attention (``attend``), see
    :class:`~r1kit.model.cache.KVCacheView`. Outside packages change how the layer computes by
    swapping it for a subclass that overrides :meth:`project_qkv` or :meth:`mix_weight`.
    """

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.kind = config.attention[layer_idx]
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        d = config.hidden_size
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=False)
        self.qkv_sizes = [self.num_heads * self.head_dim] + [self.num_kv_heads * self.head_dim] * 2
        if self.kind == "hybrid":
            gate_out = self.num_heads if config.hybrid_gate == "head" else 1
            self.gate = nn.Sequential(nn.Linear(d, d // 4), nn.SiLU(), nn.Linear(d // 4, gate_out))
        # what a hybrid layer asks a cache for as its global branch
        self.global_branch = "compressed" if config.hybrid_global == "compressed" else "global"

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The query, key and value projections of ``x`` [B, m, d]: ``(q, k, v)``, each [B, m, heads·D].

        A subclass that computes all three in one product returns ``(qkv, None, None)`` instead, the
        heads side by side in q, k, v order (``qkv_sizes``): a cache can then rotate, store and attend
        them in one call, and they are split only where it does not."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def mix_weight(self, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """The hybrid's weight of its local branch for the heads of ``q``: [B, 1 or H, m, 1]."""
        return torch.sigmoid(self.gate(x)).transpose(1, 2)[..., None]

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        window: int,
        cache: "KVCacheView | None" = None,
    ) -> torch.Tensor:
        batch, m, _ = x.shape
        q, k, v = self.project_qkv(x)
        if k is None:  # one product made all three
            # the hybrid mixes two branches of the same q, so only it keeps the two-call path
            if cache is not None and self.kind != "hybrid":
                out = cache.rope_store_attend(self.layer_idx, self.kind, q, cos, sin, self.num_heads)
                if out is not None:
                    return self.o_proj(out)
            q, k, v = q.split(self.qkv_sizes, dim=-1)
        # -1 heads: a subclass may project only a share of the heads (tensor parallelism)
        q = q.view(batch, m, -1, self.head_dim).transpose(1, 2)
        k = k.view(batch, m, -1, self.head_dim).transpose(1, 2)
        v = v.view(batch, m, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is None:
            out = self._attend(x, q, k, v, window)
        else:
            k, v = cache.update(self.layer_idx, k, v)
            out = self._attend_by_cache(x, q, k, v, cache)
        return self.o_proj(out.transpose(1, 2).reshape(batch, m, -1))

    def _attend(self, x, q, k, v, window: int) -> torch.Tensor:
        if self.kind == "global":
            return global_attention(q, k, v)
        if self.kind == "local":
            return local_attention(q, k, v, window)
        return self._hybrid(x, q, k, v, window)

    def _attend_by_cache(self, x, q, k, v, cache: "KVCacheView") -> torch.Tensor:
        """Attention computed by the cache, which knows each row's positions, window and padding;
        this layer only mixes the hybrid's branches."""
        if self.kind != "hybrid":
            return cache.attend(self.layer_idx, self.kind, q, k, v)
        g = self.mix_weight(x, q)
        threshold = None if self.training else self.config.hybrid_gate_threshold
        out = cache.attend_hybrid(self.layer_idx, self.global_branch, q, k, v, g, threshold)
        if out is not None:  # the cache mixed the branches itself, skipping the global work it could
            return out
        local = cache.attend(self.layer_idx, "local", q, k, v)
        mixed = g * local + (1 - g) * cache.attend(self.layer_idx, self.global_branch, q, k, v)
        if threshold is None:
            return mixed
        # the hard gate's rule (see _hard_gated): confident tokens are local only. This path computes
        # the global branch for every row anyway, so it keeps results, not time.
        return torch.where(hard_gate_local(g, threshold), local, mixed)

    def _global_branch(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.global_branch == "compressed":
            return compressed_global_attention(q, k, v, self.config.hybrid_compress_block)
        return global_attention(q, k, v)

    def _hybrid(self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
        local = local_attention(q, k, v, window)
        g = self.mix_weight(x, q)
        threshold = self.config.hybrid_gate_threshold
        if threshold is None or self.training:
            return g * local + (1 - g) * self._global_branch(q, k, v)
        return self._hard_gated(q, k, v, local, g, threshold)

    def _hard_gated(self, q, k, v, local, g, threshold: float) -> torch.Tensor:
        """Inference with a hard gate: tokens whose gate (every head's) is >= threshold are local only,
        and the global branch runs only for the rest, so its cost shrinks with the gate's confidence."""
        needs_global = ~hard_gate_local(g, threshold)[:, 0, :, 0]  # [B, m]
        out = local.clone()
        n, m = k.shape[2], q.shape[2]
        for b in range(q.shape[0]):
            rows = needs_global[b].nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            if self.global_branch == "compressed":
                glob = compressed_global_attention(q[b : b + 1], k[b : b + 1], v[b : b + 1], self.config.hybrid_compress_block)[:, :, rows]
            else:  # chunks of rows, each over the keys up to its last row only: causal skipping kept
                parts = []
                for lo in range(0, rows.numel(), 256):
                    chunk = rows[lo : lo + 256]
                    last = int(chunk[-1]) + (n - m) + 1
                    mask = torch.arange(last, device=q.device)[None, :] <= (chunk[:, None] + (n - m))
                    parts.append(sdpa(q[b : b + 1, :, chunk], k[b : b + 1, :, :last], v[b : b + 1, :, :last], mask=mask))
                glob = torch.cat(parts, dim=2)
            gb = g[b : b + 1, :, rows]
            out[b : b + 1, :, rows] = gb * local[b : b + 1, :, rows] + (1 - gb) * glob
        return out
