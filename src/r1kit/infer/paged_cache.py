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
the context length), so a decode step's local attention costs O(w), not O(n); one unpadded row (a
long prompt's chunk) takes the model's blocked local attention, O(m·w). Local layers also hold
only their window: in an all-local model the one block table drops the blocks the window left
(the engine frees them); where windowed layers sit beside layers that keep every block, they have
a pool and a block table of their own (the window group, :func:`splits_window`), whose blocks the
block manager releases as the window leaves them.

Hybrid layers with ``hybrid_global: compressed`` keep a second, small cache: the mean-pooled K/V of
each complete run of ``c = hybrid_compress_block`` positions (the model's
:func:`~r1kit.model.attention.compressed_global_attention`), written by the step that completes the
run. Its entries live in the main table's blocks (``max(1, block_size / c)`` entries a block, one
entry every ``c / block_size`` blocks when ``c`` is larger), so prefix caching and preemption cover
them with no bookkeeping of their own. Such a layer's raw keys are only needed for its local branch
and its runs' pooling: they are windowed. A hybrid layer's branches are mixed here
(:meth:`PagedBatch.attend_hybrid`): under the hard gate's threshold the global branch runs only for
the tokens (prefill) or sequences (decode, inside the kernel) that need it.
This module never decides which blocks a sequence owns: the block manager does.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from r1kit.config import ModelConfig
from r1kit.errors import ConfigError
from r1kit.model.attention import hard_gate_local, local_attention, sdpa, window_mask, window_start


def compressed_layers(config: ModelConfig) -> list[int]:
    """The layers that keep pooled K/V: hybrid layers of a ``hybrid_global: compressed`` model."""
    return [i for i, kind in enumerate(config.attention) if kind == "hybrid" and config.hybrid_global == "compressed"]


def entries_per_block(config: ModelConfig, block_size: int) -> int:
    """Pooled entries a block holds: ``block_size / c``, or 1 when a run of ``c`` spans several blocks.
    Raises ConfigError where neither divides the other (an entry's home block would vary)."""
    c = config.hybrid_compress_block
    if block_size % c and c % block_size:
        raise ConfigError(f"block_size={block_size} and hybrid_compress_block={c}: one must divide the other for the engine's "
                          f"compressed cache; choose block_size {c} or a power of two that divides it")
    return max(1, block_size // c)


def windowed_layers(config: ModelConfig) -> list[int]:
    """The layers whose raw K/V are read only within a window: local layers, and compressed hybrids
    (their global branch reads the pooled entries)."""
    pooled = compressed_layers(config)
    return [i for i, kind in enumerate(config.attention) if kind == "local" or i in pooled]


def splits_window(config: ModelConfig) -> bool:
    """Whether windowed layers get blocks of their own (the window group): where they sit beside layers
    that keep every block (global or full hybrid layers, or pooled entries). In an all-local model the
    one table already frees what the window left."""
    windowed = windowed_layers(config)
    return bool(windowed) and (len(windowed) < config.num_layers or bool(compressed_layers(config)))


def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype, group: str = "main") -> int:
    """Bytes of one block of ``block_size`` tokens in ``group``: ``main`` holds the K/V of every layer
    not in the window group and the pooled entries of compressed layers; ``window`` the K/V of the
    windowed layers when :func:`splits_window`."""
    windowed = windowed_layers(config) if splits_window(config) else []
    if group == "window":
        rows = len(windowed) * block_size
    else:
        rows = (config.num_layers - len(windowed)) * block_size
        if compressed_layers(config):
            rows += len(compressed_layers(config)) * entries_per_block(config, block_size)
    return 2 * rows * config.num_kv_heads * config.head_dim * torch.empty((), dtype=dtype).element_size()


class KVPool:
    """``decode_kernel``: a :class:`~r1kit.infer.decode_attention.PagedDecodeKernel` (or its Triton
    twin, :class:`~r1kit.infer.triton_decode_attention.TritonPagedDecode`) that one-token
    rows attend through, reading the pool in place; None: they gather like every other row."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device,
                 decode_kernel=None, window_blocks: int = 0) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.decode_kernel = decode_kernel if decode_kernel is not None and decode_kernel.supports(dtype, device) else None
        # the table each layer's raw K/V are found through: 0 the main one, 1 the window group's (window_blocks blocks)
        split = splits_window(config)
        if split != (window_blocks > 0):
            raise ValueError(f"window_blocks={window_blocks}: give the window group blocks exactly when splits_window(config) ({split})")
        windowed = windowed_layers(config) if split else []
        self.groups = [1 if i in windowed else 0 for i in range(config.num_layers)]
        self.window_blocks = window_blocks
        # never read before written: padded key slots point at a written slot of the same row
        shapes = [((window_blocks if g else num_blocks) * block_size, config.num_kv_heads, config.head_dim) for g in self.groups]
        self.k = [torch.empty(shape, dtype=dtype, device=device) for shape in shapes]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for shape in shapes]
        # the compressed cache: pooled K/V of runs of `compress` positions, `entries` a block (None: no such layer)
        self.pooled = pooled = compressed_layers(config)
        self.compress = config.hybrid_compress_block if pooled else None
        self.entries = entries_per_block(config, block_size) if pooled else 0
        cshape = (num_blocks * self.entries, config.num_kv_heads, config.head_dim)
        self.ck = [torch.empty(cshape, dtype=dtype, device=device) if i in pooled else None for i in range(config.num_layers)]
        self.cv = [torch.empty(cshape, dtype=dtype, device=device) if i in pooled else None for i in range(config.num_layers)]
        # the keys a layer's update hands back: a windowed layer's only reach back its window
        self.layouts = ["local" if i in windowed_layers(config) else "global" for i in range(config.num_layers)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v + self.ck + self.cv if t is not None)


class PagedRange(NamedTuple):
    """What a decode kernel reads for one branch: row ``s`` attends to positions (or pooled entries)
    ``[lowest[s], contexts[s])``, position ``p`` at slot ``tables[s, p // block_size] · block_size + p % block_size``
    of the pools ``k``/``v`` [slots, Hkv, D]."""

    k: torch.Tensor
    v: torch.Tensor
    tables: torch.Tensor
    contexts: torch.Tensor
    lowest: torch.Tensor
    block_size: int


def _no_compressed_cache(layer_idx: int) -> ConfigError:
    return ConfigError(f"layer {layer_idx} keeps no compressed K/V: only the hybrid layers of a model with hybrid_global=compressed attend to it")


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
        window_tables: list[list[int]] | None = None,
    ) -> None:
        """``window_tables``: each row's table of the window group, where the pool has one."""
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
        if (window_tables is not None) != bool(pool.window_blocks):
            raise ValueError("PagedBatch: give window_tables exactly when the pool has a window group")
        # per table group: [B, W] block ids (blocks freed out of every reading layer's window are -1:
        # no position of theirs is ever read) and the slot of each position
        self._tables = [self._table_tensor(block_tables, device)]
        if window_tables is not None:
            self._tables.append(self._table_tensor(window_tables, device))
        self._slot_fns = [lambda pos, t=t: t.gather(1, pos // bs) * bs + pos % bs for t in self._tables]
        # one token per row and a kernel that reads the pool in place: no gather, no mask
        self.direct = m == 1 and pool.decode_kernel is not None
        self._fused = self.direct and hasattr(pool.decode_kernel, "rope_attend")  # the GPU's kernel has no fused call

        self.all_valid = all(n == m for n in lengths)
        # the rows of the flattened [B·m] new tokens that are not padding, and their slots in each group
        if self.all_valid:
            self.write_src = torch.arange(len(lengths) * m, device=device)
        else:
            self.write_src = torch.tensor([b * m + i for b, n in enumerate(lengths) for i in range(m - n, m)], device=device)
        self._write_dst = [fn(self.positions).flatten() for fn in self._slot_fns]
        if not self.all_valid:
            self._write_dst = [dst.index_select(0, self.write_src) for dst in self._write_dst]
        # every sequence starts at 0 and is left-padded to the same width: the new K/V are the whole context
        self.fresh = all(s == 0 for s in starts)
        self.windows = torch.tensor(windows, device=device)
        self._one_row = windows[0] if len(lengths) == 1 else None  # the window of a view of one row
        local_lowest = [window_start(s, w) for s, w in zip(starts, windows)]  # each row's first query's first key
        # the first position each row's keys start from, by kind of attention (and of key layout)
        self._lowest = {"global": torch.zeros_like(starts_t), "local": torch.tensor(local_lowest, device=device)}
        contexts = [s + n for s, n in zip(starts, lengths)]
        self._widths = {"global": max(contexts), "local": max(c - low for c, low in zip(contexts, local_lowest))}
        # the keys each layer's update returns; when every window reaches position 0, one layout serves all
        shrinks = any(local_lowest)
        self._layer_layout = ["local" if name == "local" and shrinks else "global" for name in pool.layouts]
        self._layouts: dict[tuple[str, int], _Layout] = {}  # (layout, table group)
        self._masks: dict[tuple[str, str], torch.Tensor] = {}  # (layout, kind)
        self._no_skip = torch.zeros(len(lengths), dtype=torch.long, device=device)
        if pool.compress is not None:
            self._plan_compressed(starts, contexts, device)

    def _plan_compressed(self, starts: list[int], contexts: list[int], device: torch.device) -> None:
        """Where each row's pooled entries live, and which entries this step completes (from the lists alone)."""
        c, per, bs = self.pool.compress, self.pool.entries, self.pool.block_size
        # entry j's home: block j // per of `ctables` (every (c / bs)-th block, the one holding the run's end)
        stride = max(1, c // bs)
        self._ctables = self._tables[0][:, stride - 1 :: stride].contiguous()
        self._cslots = lambda rows, j: self._ctables[rows, j // per] * per + j % per
        self.ccontexts = self.contexts // c  # a query sees the entries whose run ends at or before it
        self._centries = max(contexts) // c
        done = [(b, j) for b, (s, n) in enumerate(zip(starts, contexts)) for j in range(s // c, n // c)]  # runs ending in this step
        self._pool_from = self._pool_to = None
        if done:
            rows = torch.tensor([b for b, _ in done], device=device)
            j = torch.tensor([j for _, j in done], device=device)
            pos = j[:, None] * c + torch.arange(c, device=device)[None, :]
            raw = self._tables[self.pool.groups[self.pool.pooled[0]]]  # where the runs' raw K/V are
            self._pool_from = (raw[rows[:, None], pos // bs] * bs + pos % bs).flatten()
            self._pool_to = self._cslots(rows, j)

    def next_positions(self, m: int, device: torch.device) -> torch.Tensor:
        """Each row's positions [B, m] (padded query columns at 0)."""
        if m != self.m:
            raise ValueError(f"this view holds {self.m} new tokens per row, not {m}")
        return self.positions

    def advance(self, tokens: int) -> None:
        """Nothing: a view serves one forward; the engine moves its sequences on."""

    @staticmethod
    def _table_tensor(tables: list[list[int]], device: torch.device) -> torch.Tensor:
        width = max(len(t) for t in tables)
        return torch.tensor([t + [0] * (width - len(t)) for t in tables], device=device)

    def _layout(self, name: str, group: int) -> _Layout:
        layout = self._layouts.get((name, group))
        if layout is None:
            layout = self._layouts[name, group] = _Layout(self._lowest[name], self.contexts, self._slot_fns[group], self._widths[name])
        return layout

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, heads, m, dim = k.shape
        for new, pool in ((k, self.pool.k[layer_idx]), (v, self.pool.v[layer_idx])):
            flat = new.transpose(1, 2).reshape(batch * m, heads, dim)
            if not self.all_valid:
                flat = flat.index_select(0, self.write_src)
            pool.index_copy_(0, self._write_dst[self.pool.groups[layer_idx]], flat.to(pool.dtype))
        if self.pool.ck[layer_idx] is not None and self._pool_from is not None:
            # the model's pooling: the mean of a run's rotated keys (and values), in the model's dtype
            for raw, pooled in ((self.pool.k[layer_idx], self.pool.ck[layer_idx]), (self.pool.v[layer_idx], self.pool.cv[layer_idx])):
                run = raw.index_select(0, self._pool_from).view(-1, self.pool.compress, heads, dim).to(k.dtype)
                pooled.index_copy_(0, self._pool_to, run.mean(dim=1).to(pooled.dtype))
        if self.direct:
            return k, v  # attend() reads the pool, not these
        name = self._layer_layout[layer_idx]
        if self.fresh and name == "global":
            return k, v
        read = self._layout(name, self.pool.groups[layer_idx]).read
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
        group = self.pool.groups[layer_idx]
        return self.pool.decode_kernel.rope_attend(qkv, cos, sin, self.pool.k[layer_idx], self.pool.v[layer_idx], self._write_dst[group],
                                                   self._tables[group], self.contexts, self._lowest[kind], self.pool.block_size, num_heads)

    def attend(self, layer_idx: int, kind: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention of ``kind`` (``global``, ``local`` or ``compressed``) over the keys layer
        ``layer_idx``'s ``update`` returned (``k``, ``v``) or its pooled entries, or, for one-token rows
        with the decode kernel, over that layer's keys in the pool."""
        if self.direct:
            return self.pool.decode_kernel(q, *self._range(layer_idx, kind))
        if kind == "compressed":
            return self._compressed(layer_idx, q)
        if kind == "local" and self._one_row is not None:
            # one unpadded row: its queries are the last of its keys, the model's own rule, whose
            # blocked path costs O(m·w) where a [m, m + w] mask would cost O(m²) on a long chunk
            return local_attention(q, k, v, self._one_row)
        return sdpa(q, k, v, mask=self.attention_mask(self._layer_layout[layer_idx], kind))

    def attend_hybrid(self, layer_idx: int, branch: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                      threshold: float | None) -> torch.Tensor | None:
        """A hybrid layer's ``g·local + (1−g)·global`` (``branch``: ``global`` or ``compressed``). Under a
        ``threshold``, the global branch is computed only for the tokens the hard gate does not send to
        the local branch alone: inside the kernel per sequence for one-token rows, per token otherwise.
        None for one-token rows whose kernel has no hybrid call (the layer then mixes two calls)."""
        local_only = None if threshold is None else hard_gate_local(g, threshold)  # [B, 1, m, 1]
        if self.direct:
            kernel = self.pool.decode_kernel
            if not hasattr(kernel, "hybrid"):
                return None
            gate = g.to(torch.float32).expand(-1, q.shape[1], -1, -1).reshape(q.shape[0], q.shape[1]).contiguous()
            skip = self._no_skip if local_only is None else local_only.view(-1).long()
            return kernel.hybrid(q, self._range(layer_idx, "local"), self._range(layer_idx, branch), gate, skip)
        local = self.attend(layer_idx, "local", q, k, v)
        if local_only is None:
            return g * local + (1 - g) * self.attend(layer_idx, branch, q, k, v)
        needs = ~local_only[:, 0, :, 0]  # [B, m]
        if not bool(needs.any()):
            return local
        glob = local.new_zeros(local.shape)
        for b in needs.any(dim=1).nonzero()[:, 0].tolist():
            rows = needs[b].nonzero()[:, 0]
            glob[b, :, rows] = self._global_rows(layer_idx, branch, b, rows, q[b : b + 1].index_select(2, rows), k, v)[0]
        return torch.where(local_only, local, g * local + (1 - g) * glob)

    def _global_rows(self, layer_idx: int, branch: str, b: int, rows: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     v: torch.Tensor) -> torch.Tensor:
        """Row ``b``'s global branch for its query columns ``rows`` only ([1, H, len(rows), D] of ``q``),
        over the keys (or entries) up to the last of them: the work skipped tokens would cost is not done."""
        if branch == "compressed":
            keys, values, mask, sees = self._pooled_keys(layer_idx)
            last = (int(self.q_pos[b, rows[-1]]) + 1) // self.pool.compress
            if last == 0:
                return q.new_zeros(q.shape)
            out = sdpa(q, keys[b : b + 1, :, :last], values[b : b + 1, :, :last], mask=mask[b : b + 1, :, rows, :last])
            return out.masked_fill(~sees[b : b + 1, None, rows, None], 0)
        name = self._layer_layout[layer_idx]
        n = k.shape[2]
        last = n - int(self.contexts[b]) + int(self.q_pos[b, rows[-1]]) + 1  # the column of that query's own key, plus one
        mask = self.attention_mask(name, "global")[b : b + 1].index_select(2, rows)[..., :last]
        return sdpa(q, k[b : b + 1, :, :last], v[b : b + 1, :, :last], mask=mask)

    def _range(self, layer_idx: int, kind: str) -> PagedRange:
        """The pool, tables and position range a decode kernel reads for attention of ``kind``."""
        if kind == "compressed":
            if self.pool.ck[layer_idx] is None:
                raise _no_compressed_cache(layer_idx)
            return PagedRange(self.pool.ck[layer_idx], self.pool.cv[layer_idx], self._ctables, self.ccontexts, self._lowest["global"],
                              self.pool.entries)
        return PagedRange(self.pool.k[layer_idx], self.pool.v[layer_idx], self._tables[self.pool.groups[layer_idx]], self.contexts,
                          self._lowest[kind], self.pool.block_size)

    def _pooled_keys(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each row's pooled K/V gathered as [B, Hkv, E, D] (entry j in column j), the [B, 1, m, E] mask
        of the entries each query sees (a run ending at or before it), and [B, m]: whether it sees any."""
        if self.pool.ck[layer_idx] is None:
            raise _no_compressed_cache(layer_idx)
        count = max(self._centries, 1)
        j = torch.arange(count, device=self.contexts.device)
        rows = torch.arange(self.contexts.shape[0], device=j.device)[:, None]
        read = self._cslots(rows, torch.minimum(j[None, :], (self.ccontexts[:, None] - 1).clamp_min(0))).flatten()
        shape = (self.contexts.shape[0], count, *self.pool.ck[layer_idx].shape[1:])
        keys, values = (t.index_select(0, read).view(shape).transpose(1, 2) for t in (self.pool.ck[layer_idx], self.pool.cv[layer_idx]))
        mask = (j[None, None, :] + 1) * self.pool.compress - 1 <= self.q_pos[:, :, None]  # padded queries (-1) see none
        sees = mask.any(dim=2)
        mask = mask | (~sees[:, :, None] & (j == 0))  # rows that see nothing attend to one entry, then are zeroed
        return keys, values, mask[:, None], sees

    def _compressed(self, layer_idx: int, q: torch.Tensor) -> torch.Tensor:
        """The compressed branch over the pooled entries; zeros for a query before the first complete run."""
        if self.pool.ck[layer_idx] is None:
            raise _no_compressed_cache(layer_idx)
        if self._centries == 0:
            return q.new_zeros(q.shape)
        keys, values, mask, sees = self._pooled_keys(layer_idx)
        return sdpa(q, keys.to(q.dtype), values.to(q.dtype), mask=mask).masked_fill(~sees[:, None, :, None], 0)

    def attention_mask(self, layout_name: str, kind: str) -> torch.Tensor:
        """[B, 1, m, n] boolean: which keys of layout ``layout_name`` each query may see in attention of ``kind``."""
        key = (layout_name, kind)
        mask = self._masks.get(key)
        if mask is None:
            if kind not in self._lowest:
                raise ValueError(f"attention of kind {kind!r} has no mask over raw keys (kinds: {tuple(self._lowest)})")
            layout = self._layout(layout_name, 0)  # masks read positions only: any group's layout serves
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
    ``window_tables``: each item's table of the window group, where the pool has one.
    """

    def __init__(self, pool: KVPool, items: list[tuple[list[int], int, int, int]], device: torch.device,
                 window_tables: list[list[int]] | None = None) -> None:
        lengths = [n for _, _, n, _ in items]
        self.singles = sum(1 for n in lengths if n == 1)
        if any(n != 1 for n in lengths[: self.singles]):
            raise ValueError("PackedBatch: rows computing one token must come first")
        self.window = max(w for *_, w in items)
        parts = ((0, self.singles), (self.singles, len(items)))
        self.single, self.multi = (
            PagedBatch(pool, [t for t, *_ in items[a:b]], [s for _, s, _, _ in items[a:b]], [n for _, _, n, _ in items[a:b]],
                       [w for *_, w in items[a:b]], device, None if window_tables is None else window_tables[a:b]) if b > a else None
            for a, b in parts
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
        single, multi = self._held(layer_idx)
        qs, qm = self._split(q)
        return self._join(self.single.attend(layer_idx, kind, qs, *single) if self.single is not None else None,
                          self.multi.attend(layer_idx, kind, qm, *multi) if self.multi is not None else None)

    def attend_hybrid(self, layer_idx: int, branch: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                      threshold: float | None) -> torch.Tensor | None:
        """Each group's :meth:`PagedBatch.attend_hybrid`; None where the one-token group has no hybrid kernel call."""
        single, multi = self._held(layer_idx)
        (qs, qm), (gs, gm) = self._split(q), self._split(g)
        out_single = None
        if self.single is not None:
            out_single = self.single.attend_hybrid(layer_idx, branch, qs, *single, gs, threshold)
            if out_single is None:
                return None
        out_multi = self.multi.attend_hybrid(layer_idx, branch, qm, *multi, gm, threshold) if self.multi is not None else None
        return self._join(out_single, out_multi)

    def _held(self, layer_idx: int) -> tuple:
        held, single, multi = self._kv
        if held != layer_idx:
            raise RuntimeError(f"attend() of layer {layer_idx} after update() of layer {held}: the cache protocol is update, then attend, per layer")
        return single, multi

    def _join(self, single: torch.Tensor | None, multi: torch.Tensor | None) -> torch.Tensor:
        """The groups' outputs ([S, H, 1, D] and [Bm, H, m, D]; None for a group that is absent) back in the packed row [1, H, T, D]."""
        outs = []
        if single is not None:
            outs.append(single.transpose(0, 2))
        if multi is not None:
            heads, dim = multi.shape[1], multi.shape[-1]
            outs.append(multi.transpose(0, 1).reshape(heads, -1, dim).index_select(1, self._valid)[None])
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
