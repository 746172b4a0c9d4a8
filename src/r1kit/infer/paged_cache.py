"""The paged KV cache: a pool of fixed-size blocks per layer, and the cache views of one forward.

:class:`KVPool` holds, per layer, K and V as ``[num_blocks · block_size, Hkv, D]`` (a block is
``block_size`` consecutive slots). The engine hands the model a :class:`PackedBatch`: every
scheduled sequence's new tokens side by side in one row of ``T`` tokens, decodes (one token each)
first, then prefill chunks. The projections and FFNs run over the ``T`` real tokens (no padding);
attention is the cache's business (the model's cache protocol, ``update`` then ``attend``), done per
group by a :class:`PagedBatch`:

* ``update(layer, k_new, v_new)`` writes the new tokens' K/V into their slots, then gathers each
  sequence's whole context from its blocks into a left-padded ``[B, Hkv, n, D]`` tensor;
* ``attend(kind, q, k, v)`` runs attention under a mask built from per-sequence positions: causal,
  padding excluded, and for local layers ``q_pos - k_pos < window`` with each sequence's own window
  (windows are fixed per request at admission).

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
from r1kit.model.attention import sdpa


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
    can reach (from ``starts[b] - window + 1``), so their attention does not grow with the context. The
    masks describe the keys of the latest ``update`` (the model asks for them right after it).
    Every size and every yes/no the view needs is worked out from the Python lists: building one never
    waits for the device (on a GPU each such read would be a synchronisation)."""

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
        self._tables, self._layer = tables, 0

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
        local_lowest = [max(0, s - w + 1) for s, w in zip(starts, windows)]
        self._lowest = {"full": torch.zeros_like(starts_t), "local": torch.tensor(local_lowest, device=device)}
        contexts = [s + n for s, n in zip(starts, lengths)]
        self._widths = {"full": max(contexts), "local": max(c - low for c, low in zip(contexts, local_lowest))}
        if not any(local_lowest):
            self._lowest["local"] = self._lowest["full"]  # every window reaches position 0: one layout
        self._layouts: dict[str, _Layout] = {}
        self._masks: dict[tuple[str, str], torch.Tensor] = {}  # (layout, kind)
        self._current = "full"

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
            self._layer = layer_idx
            return k, v  # attend() reads the pool, not these
        name = "local" if self.pool.kinds[layer_idx] == "local" else "full"
        if self._lowest[name] is self._lowest["full"]:
            name = "full"
        self._current = name
        if self.fresh and name == "full":
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
        kernel = self.pool.decode_kernel
        if not self.direct or not hasattr(kernel, "rope_attend") or qkv.dtype != self.pool.k[layer_idx].dtype:
            return None
        lowest = self._lowest["local" if kind == "local" else "full"]
        return kernel.rope_attend(qkv, cos, sin, self.pool.k[layer_idx], self.pool.v[layer_idx], self.write_dst, self._tables,
                                  self.contexts, lowest, self.pool.block_size, num_heads)

    def attend(self, kind: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention of ``kind`` over the keys the latest ``update`` returned (``k``, ``v``), or, for
        one-token rows with the decode kernel, over the latest updated layer's keys in the pool."""
        if self.direct:
            lowest = self._lowest["local" if kind == "local" else "full"]
            layer = self._layer
            return self.pool.decode_kernel(q, self.pool.k[layer], self.pool.v[layer], self._tables, self.contexts, lowest, self.pool.block_size)
        return sdpa(q, k, v, mask=self.attention_mask(kind))

    def attention_mask(self, kind: str) -> torch.Tensor:
        """[B, 1, m, n] boolean: which keys (of the latest ``update``) each query may see."""
        key = (self._current, kind)
        mask = self._masks.get(key)
        if mask is None:
            layout = self._layout(self._current)
            q, k = self.q_pos[:, :, None], layout.k_pos[:, None, :]
            mask = (k >= 0) & (k <= q)
            if kind == "local":
                mask &= q - k < self.windows[:, None, None]
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
        self._kv: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    # [1, H, T, D] <-> the groups' [B, H, m, D] layouts
    def _split(self, t: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        single = t[:, :, : self.singles].transpose(0, 2) if self.single is not None else None  # [S, H, 1, D], a view
        multi = None
        if self.multi is not None:
            rows, m = self.multi.q_pos.shape
            packed = t[0, :, self.singles :]  # [H, Tm, D]
            multi = packed.index_select(1, self._pad_from).view(t.shape[1], rows, m, t.shape[-1]).transpose(0, 1)
        return single, multi

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        (ks, km), (vs, vm) = self._split(k), self._split(v)
        if self.single is not None:
            self._kv["single"] = self.single.update(layer_idx, ks, vs)
        if self.multi is not None:
            self._kv["multi"] = self.multi.update(layer_idx, km, vm)
        return k, v  # attend() reads each group's gathered keys, not these

    def attend(self, kind: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        qs, qm = self._split(q)
        outs = []
        if self.single is not None:
            outs.append(self.single.attend(kind, qs, *self._kv["single"]).transpose(0, 2))
        if self.multi is not None:
            out = self.multi.attend(kind, qm, *self._kv["multi"])  # [Bm, H, m, D]
            heads, dim = out.shape[1], out.shape[-1]
            outs.append(out.transpose(0, 1).reshape(heads, -1, dim).index_select(1, self._valid)[None])
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
