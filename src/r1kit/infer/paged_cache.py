"""The paged KV cache: a pool of fixed-size blocks per layer, and the cache view of one batched forward.

:class:`KVPool` holds, per layer, K and V as ``[num_blocks · block_size, Hkv, D]`` (a block is
``block_size`` consecutive slots). :class:`PagedBatch` is what the model is handed for one forward
over several sequences at different positions. It implements the model's cache protocol:

* ``update(layer, k_new, v_new)`` writes the new tokens' K/V into their slots, then gathers each
  sequence's whole context from its blocks into a left-padded ``[B, Hkv, n, D]`` tensor;
* ``attention_mask(kind, window)`` says which keys each query sees, from per-sequence positions:
  causal, padding excluded, and for local layers ``q_pos - k_pos < window`` with each sequence's own
  window (the ``window`` argument is ignored: windows are fixed per request at admission).

Queries are left-padded too, so every row's newest token is the last column (``last_only`` logits).
Local layers get the same full context as global ones: the mask limits them to their window. A
sequence keeps every block until it ends, whatever its layers' kinds (simple and always correct;
freeing blocks that left every layer's window is possible only for all-local models, and not done).
This module never decides which blocks a sequence owns: the block manager does.
"""

from __future__ import annotations

import torch

from r1kit.config import ModelConfig


def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """K and V of every layer for ``block_size`` tokens."""
    return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * torch.empty((), dtype=dtype).element_size()


class KVPool:
    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (num_blocks * block_size, config.num_kv_heads, config.head_dim)
        # never read before written: padded key slots point at a written slot of the same row
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class PagedBatch:
    """One forward's view of the pool: row ``b`` computes ``lengths[b]`` tokens from position ``starts[b]``."""

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
        batch = len(starts)
        m, n = max(lengths), max(s + q for s, q in zip(starts, lengths))
        self.m, self.n = m, n
        self.window = max(windows)  # the model's default; the masks use each row's own
        starts_t = torch.tensor(starts, device=device)
        lengths_t = torch.tensor(lengths, device=device)
        contexts = starts_t + lengths_t
        # query column i of row b holds position starts[b] + lengths[b] - m + i; the first m - lengths[b] are padding (-1)
        column = torch.arange(m, device=device)[None, :]
        q_valid = column >= m - lengths_t[:, None]
        self.q_pos = torch.where(q_valid, starts_t[:, None] + lengths_t[:, None] - m + column, -1)
        # key column j of row b holds position contexts[b] - n + j (negative: padding)
        self.k_pos = contexts[:, None] - n + torch.arange(n, device=device)[None, :]
        self.positions = self.q_pos.clamp_min(0)
        width = max(len(t) for t in block_tables)
        tables = torch.tensor([t + [0] * (width - len(t)) for t in block_tables], device=device)

        def slots(pos: torch.Tensor) -> torch.Tensor:
            return tables.gather(1, pos // bs) * bs + pos % bs

        self.all_valid = bool(q_valid.all())
        self.write_src = q_valid.flatten().nonzero().squeeze(1)  # rows of the flattened [B·m] new tokens
        self.write_dst = slots(self.positions)[q_valid]
        # every sequence starts at 0 and is left-padded to the same width: the new K/V are the context
        self.fresh = all(s == 0 for s in starts)
        # padded key columns read the row's newest slot (written, finite), and are masked out
        self.read = slots(torch.where(self.k_pos >= 0, self.k_pos, contexts[:, None] - 1))
        self.windows = torch.tensor(windows, device=device)
        self._masks: dict[str, torch.Tensor] = {}
        self.batch = batch

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, heads, m, dim = k.shape
        for new, pool in ((k, self.pool.k[layer_idx]), (v, self.pool.v[layer_idx])):
            flat = new.transpose(1, 2).reshape(batch * m, heads, dim)
            if not self.all_valid:
                flat = flat.index_select(0, self.write_src)
            pool.index_copy_(0, self.write_dst, flat.to(pool.dtype))
        if self.fresh:
            return k, v
        k_all = self.pool.k[layer_idx][self.read].transpose(1, 2)
        v_all = self.pool.v[layer_idx][self.read].transpose(1, 2)
        return k_all.to(k.dtype), v_all.to(v.dtype)

    def attention_mask(self, kind: str, window: int | None = None) -> torch.Tensor:
        """[B, 1, m, n] boolean: which keys each query may see."""
        mask = self._masks.get(kind)
        if mask is None:
            q, k = self.q_pos[:, :, None], self.k_pos[:, None, :]
            mask = (k >= 0) & (k <= q)
            if kind == "local":
                mask &= q - k < self.windows[:, None, None]
            mask |= (q < 0) & (torch.arange(self.n, device=q.device) == self.n - 1)  # padded rows see one key
            mask = self._masks[kind] = mask[:, None]
        return mask
