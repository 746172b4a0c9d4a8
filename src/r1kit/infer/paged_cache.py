"""The paged KV cache: a pool of fixed-size blocks per layer, and the cache views of one forward.

:class:`KVPool` holds, per layer, K and V as ``[num_blocks · block_size, Hkv, D]`` (a block is
``block_size`` consecutive slots). The engine hands the model a :class:`PackedBatch`: every
scheduled sequence's new tokens side by side in one row of ``T`` tokens, decodes (one token each)
first, then prefill chunks. The projections and FFNs run over the ``T`` real tokens (no padding);
attention is the cache's business (the model's :class:`~r1kit.model.cache.KVCacheView` protocol,
``update`` then ``attend``), done per group by a :class:`PagedBatch`:

* ``update(layer, k_new, v_new)`` writes the new tokens' K/V into their slots, then gathers each
  sequence's whole context from its blocks into a left-padded ``[B, Hkv, n, D]`` tensor;
* ``attend(layer, kind, q, k, v)`` runs attention under a mask built from per-sequence positions:
  causal, padding excluded, and for local layers the model's window rule
  (:func:`~r1kit.model.attention.window_mask`) with each sequence's own window (windows are fixed
  per request at admission).

The decode group's rows are single tokens, so moving them between the packed row and ``[B, ., 1, D]``
is a view; only the prefill group is left-padded (a copy, small beside a prefill's compute). A step
of decodes alone is already packed as ``[B, 1]`` and gets a :class:`PagedBatch` directly.
One-token rows skip the gather where the pool has a decode kernel
(:mod:`r1kit.infer.decode_attention` on the CPU, :mod:`r1kit.infer.triton_decode_attention` on
CUDA): it follows the block tables and reads K/V in place.
Local layers are handed only the keys their window can reach (at most m + w − 1 per row, whatever
the context length), so a decode step's local attention costs O(w), not O(n). Blocks are freed
before a sequence ends only when *every* layer is local (the engine then drops the blocks that left
the window); a global or hybrid layer needs them all.
This module never decides which blocks a sequence owns: the block manager does.
"""

from __future__ import annotations

import torch

from r1kit.config import ModelConfig
from r1kit.errors import ConfigError
from r1kit.model.attention import sdpa, window_mask, window_start


def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """K and V of every layer for ``block_size`` tokens."""
    return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * torch.empty((), dtype=dtype).element_size()


class KVPool:
    """``decode_kernel``: a :class:`~r1kit.infer.decode_attention.PagedDecodeKernel` (or its Triton
    twin, :class:`~r1kit.infer.triton_decode_attention.TritonPagedDecode`) that one-token
    rows attend through, reading the pool in place; None: they gather like every other row."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device,
                 decode_kernel=None) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.kinds = config.attention
        self.decode_kernel = decode_kernel if decode_kernel is not None and decode_kernel.supports(dtype, device) else None
        shape = (num_blocks * block_size, config.num_kv_heads, config.head_dim)
        # never read before written: padded key slots point at a written slot of the same row
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


def _unsupported(kind: str) -> ConfigError:
    return ConfigError(f"attention of kind {kind!r} (hybrid_global=compressed) is not supported with a batched (masked) cache; use hybrid_global=full")


class _Layout:
    """Which positions the gathered keys hold: row ``b`` keeps positions ``[lowest[b], contexts[b])``,
    left-padded to a common width ``n``; ``k_pos`` is -1 on padding, ``read`` the pool slot of each column."""

    def __init__(self, lowest: torch.Tensor, contexts: torch.Tensor, slots, n: int) -> None:
        self.n = n
        self.k_pos = contexts[:, None] - n + torch.arange(n, device=contexts.device)[None, :]
        valid = self.k_pos >= lowest[:, None]
        self.k_pos = torch.where(valid, self.k_pos, -1)
        self.read = slots(torch.where(valid, self.k_pos, contexts[:, None] - 1))


class PagedBatch:
    """One forward's view of the pool: row ``b`` computes ``lengths[b]`` tokens from position ``starts[b]``.

    Global and hybrid layers get each row's whole context; local layers only the keys their window
    can reach (from :func:`~r1kit.model.attention.window_start` of the row's first query), so their
    attention does not grow with the context. Which keys a layer's ``update`` returns, and so the
    mask its ``attend`` uses, follows from the layer's kind alone: ``attend`` reads no state that an
    ``update`` left. Every size and every yes/no the view needs is worked out from the Python lists:
    building one never waits for the device (on a GPU each such read would be a synchronisation)."""

    def __init__(
        self,
        pool: KVPool,
        block_tables: list[list[int]],
        starts: list[int],
        lengths: list[int],
        windows: list[int],
        device: torch.device,
    ) -> None:
        self.pool = pool
        bs = pool.block_size
        m = max(lengths)
        self.m = m
        self.window = max(windows)  # the model's default; the masks use each row's own
        starts_t = torch.tensor(starts, device=device)
        lengths_t = torch.tensor(lengths, device=device)
        self.contexts = starts_t + lengths_t
        # query column i of row b holds position starts[b] + lengths[b] - m + i; the first m - lengths[b] are padding (-1)
        column = torch.arange(m, device=device)[None, :]
        q_valid = column >= m - lengths_t[:, None]
        self.q_pos = torch.where(q_valid, starts_t[:, None] + lengths_t[:, None] - m + column, -1)
        self.positions = self.q_pos.clamp_min(0)
        width = max(len(t) for t in block_tables)
        # blocks freed out of every layer's window are -1: no position of theirs is ever read
        tables = torch.tensor([t + [0] * (width - len(t)) for t in block_tables], device=device)
        self._slots = lambda pos: tables.gather(1, pos // bs) * bs + pos % bs
        # one token per row and a kernel that reads the pool in place: no gather, no mask
        self.direct = m == 1 and pool.decode_kernel is not None
        self._fused = self.direct and hasattr(pool.decode_kernel, "rope_attend")  # the GPU's kernel has no fused call
        self._tables = tables

        self.all_valid = all(n == m for n in lengths)
        slots = self._slots(self.positions).flatten()
        # the rows of the flattened [B·m] new tokens that are not padding
        if self.all_valid:
            self.write_src, self.write_dst = torch.arange(len(lengths) * m, device=device), slots
        else:
            self.write_src = torch.tensor([b * m + i for b, n in enumerate(lengths) for i in range(m - n, m)], device=device)
            self.write_dst = slots.index_select(0, self.write_src)
        # every sequence starts at 0 and is left-padded to the same width: the new K/V are the whole context
        self.fresh = all(s == 0 for s in starts)
        self.windows = torch.tensor(windows, device=device)
        local_lowest = [window_start(s, w) for s, w in zip(starts, windows)]  # each row's first query's first key
        # the first position each row's keys start from, by kind of attention (and of key layout)
        self._lowest = {"global": torch.zeros_like(starts_t), "local": torch.tensor(local_lowest, device=device)}
        contexts = [s + n for s, n in zip(starts, lengths)]
        self._widths = {"global": max(contexts), "local": max(c - low for c, low in zip(contexts, local_lowest))}
        # the keys each layer's update returns; when every window reaches position 0, one layout serves all
        shrinks = any(local_lowest)
        self._layer_layout = ["local" if kind == "local" and shrinks else "global" for kind in pool.kinds]
        self._layouts: dict[str, _Layout] = {}
        self._masks: dict[tuple[str, str], torch.Tensor] = {}  # (layout, kind)

    def next_positions(self, m: int, device: torch.device) -> torch.Tensor:
        """Each row's positions [B, m] (padded query columns at 0)."""
        if m != self.m:
            raise ValueError(f"this view holds {self.m} new tokens per row, not {m}")
        return self.positions

    def advance(self, tokens: int) -> None:
        """Nothing: a view serves one forward; the engine moves its sequences on."""

    def _layout(self, name: str) -> _Layout:
        layout = self._layouts.get(name)
        if layout is None:
            layout = self._layouts[name] = _Layout(self._lowest[name], self.contexts, self._slots, self._widths[name])
        return layout

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, heads, m, dim = k.shape
        for new, pool in ((k, self.pool.k[layer_idx]), (v, self.pool.v[layer_idx])):
            flat = new.transpose(1, 2).reshape(batch * m, heads, dim)
            if not self.all_valid:
                flat = flat.index_select(0, self.write_src)
            pool.index_copy_(0, self.write_dst, flat.to(pool.dtype))
        if self.direct:
            return k, v  # attend() reads the pool, not these
        name = self._layer_layout[layer_idx]
        if self.fresh and name == "global":
            return k, v
        read = self._layout(name).read
        k_all = self.pool.k[layer_idx].index_select(0, read.flatten()).view(*read.shape, heads, dim).transpose(1, 2)
        v_all = self.pool.v[layer_idx].index_select(0, read.flatten()).view(*read.shape, heads, dim).transpose(1, 2)
        return k_all.to(k.dtype), v_all.to(v.dtype)

    def rope_store_attend(self, layer_idx: int, kind: str, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          num_heads: int) -> torch.Tensor | None:
        """``update`` and ``attend`` of a decode layer in one kernel call, from the fused q/k/v
        projection before the rotary embedding (see :meth:`~r1kit.infer.decode_attention.PagedDecodeKernel.rope_attend`):
        [B, 1, Hq·D]. None where the view has no such kernel (rows of several tokens, the GPU's kernel,
        a pool in another dtype): the model then takes the two-call path."""
        if not self._fused or qkv.dtype != self.pool.k[layer_idx].dtype:
            return None
        return self.pool.decode_kernel.rope_attend(qkv, cos, sin, self.pool.k[layer_idx], self.pool.v[layer_idx], self.write_dst,
                                                   self._tables, self.contexts, self._lowest[kind], self.pool.block_size, num_heads)

    def attend(self, layer_idx: int, kind: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention of ``kind`` (``global`` or ``local``) over the keys layer ``layer_idx``'s ``update``
        returned (``k``, ``v``), or, for one-token rows with the decode kernel, over that layer's keys
        in the pool."""
        if self.direct:
            lowest = self._lowest.get(kind)
            if lowest is None:
                raise _unsupported(kind)
            return self.pool.decode_kernel(q, self.pool.k[layer_idx], self.pool.v[layer_idx], self._tables, self.contexts, lowest,
                                           self.pool.block_size)
        return sdpa(q, k, v, mask=self.attention_mask(self._layer_layout[layer_idx], kind))

    def attention_mask(self, layout_name: str, kind: str) -> torch.Tensor:
        """[B, 1, m, n] boolean: which keys of layout ``layout_name`` each query may see in attention of ``kind``."""
        key = (layout_name, kind)
        mask = self._masks.get(key)
        if mask is None:
            if kind not in self._lowest:
                raise _unsupported(kind)
            layout = self._layout(layout_name)
            q, k = self.q_pos[:, :, None], layout.k_pos[:, None, :]
            mask = (k >= 0) & (k <= q)
            if kind == "local":
                mask &= window_mask(q, k, self.windows[:, None, None])
            last = torch.arange(layout.n, device=q.device) == layout.n - 1
            mask |= (q < 0) & last  # padded query rows see one key
            mask = self._masks[key] = mask[:, None]
        return mask


class PackedBatch:
    """One forward over several sequences packed into a single row: ``items`` are (block table,
    start, new tokens, window) per sequence, and the row holds each one's new tokens in order.

    Rows computing one token (decodes, or a prompt's last token) must come first: they form one
    :class:`PagedBatch` reached through views; the rest (prefill chunks) form another, left-padded.
    ``positions`` is ``[1, T]``; ``last[i]`` is the column of item ``i``'s newest token.
    """

    def __init__(self, pool: KVPool, items: list[tuple[list[int], int, int, int]], device: torch.device) -> None:
        lengths = [n for _, _, n, _ in items]
        self.singles = sum(1 for n in lengths if n == 1)
        if any(n != 1 for n in lengths[: self.singles]):
            raise ValueError("PackedBatch: rows computing one token must come first")
        self.window = max(w for *_, w in items)
        groups = (items[: self.singles], items[self.singles :])
        self.single, self.multi = (
            PagedBatch(pool, [t for t, *_ in g], [s for _, s, _, _ in g], [n for _, _, n, _ in g], [w for *_, w in g], device) if g else None
            for g in groups
        )
        parts = []
        if self.single is not None:
            parts.append(self.single.positions[:, 0])
        if self.multi is not None:
            self._valid = self.multi.write_src  # padded layout -> packed columns (row-major: packing order)
            self._pad_from = torch.zeros(self.multi.q_pos.numel(), dtype=torch.long, device=device)  # packed column of each padded slot
            self._pad_from[self._valid] = torch.arange(self._valid.numel(), device=device)
            parts.append(self.multi.positions.flatten()[self._valid])
        self.positions = torch.cat(parts)[None]
        self.last = torch.tensor(lengths, device=device).cumsum(0) - 1
        self._kv: tuple[int, tuple | None, tuple | None] = (-1, None, None)  # the latest update: (layer, single's keys, multi's keys)

    # [1, H, T, D] <-> the groups' [B, H, m, D] layouts
    def _split(self, t: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        single = t[:, :, : self.singles].transpose(0, 2) if self.single is not None else None  # [S, H, 1, D], a view
        multi = None
        if self.multi is not None:
            rows, m = self.multi.q_pos.shape
            packed = t[0, :, self.singles :]  # [H, Tm, D]
            multi = packed.index_select(1, self._pad_from).view(t.shape[1], rows, m, t.shape[-1]).transpose(0, 1)
        return single, multi

    def next_positions(self, m: int, device: torch.device) -> torch.Tensor:
        """The packed row's positions [1, T]."""
        if m != self.positions.shape[1]:
            raise ValueError(f"this view packs {self.positions.shape[1]} new tokens, not {m}")
        return self.positions

    def advance(self, tokens: int) -> None:
        """Nothing: a view serves one forward; the engine moves its sequences on."""

    def rope_store_attend(self, layer_idx: int, kind: str, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          num_heads: int) -> None:
        """None: the rows of a packed step take the two-call path."""
        return None

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each group's ``update``; the groups' keys have different widths, so they are held here for
        this layer's ``attend`` (the protocol's order: update, then attend of the same layer)."""
        (ks, km), (vs, vm) = self._split(k), self._split(v)
        single = self.single.update(layer_idx, ks, vs) if self.single is not None else None
        multi = self.multi.update(layer_idx, km, vm) if self.multi is not None else None
        self._kv = (layer_idx, single, multi)
        return k, v  # attend() reads each group's keys, not these

    def attend(self, layer_idx: int, kind: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        held, single, multi = self._kv
        if held != layer_idx:
            raise RuntimeError(f"attend() of layer {layer_idx} after update() of layer {held}: the cache protocol is update, then attend, per layer")
        qs, qm = self._split(q)
        outs = []
        if self.single is not None:
            outs.append(self.single.attend(layer_idx, kind, qs, *single).transpose(0, 2))
        if self.multi is not None:
            out = self.multi.attend(layer_idx, kind, qm, *multi)  # [Bm, H, m, D]
            heads, dim = out.shape[1], out.shape[-1]
            outs.append(out.transpose(0, 1).reshape(heads, -1, dim).index_select(1, self._valid)[None])
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
