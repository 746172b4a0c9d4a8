"""The block manager: which KV-cache blocks each sequence owns, and the prefix cache over them.

The pool has ``num_blocks`` blocks of ``block_size`` token slots. Every block is in exactly one state:

* **in use** (``ref_count > 0``): in the block table of that many sequences (a prefix-cache hit shares one);
* **cached free** (``ref_count == 0``, hashed): its K/V still describe a known token prefix, so a
  new request may revive it; kept in least-recently-freed order and evicted, oldest first, only
  when the pool needs a block (the seed's "LRU", driven by the pool's real size);
* **free** (``ref_count == 0``, no hash): empty, handed out first.

A full block is identified by a chained hash of (the previous block's hash, its token ids), seeded
with the sequence's local window (K/V of deeper layers depend on it). A hit also compares the
token ids, so a hash collision can never serve wrong K/V. A block is hashed only once its K/V have
been computed, so no sequence can hit a block that a chunked prefill has not filled yet.

A model whose windowed layers (local ones, compressed hybrids' raw K/V) sit beside layers that need
every block has a second group of blocks for them (a :class:`WindowGroup`, as vLLM's sliding-window
group): each sequence holds there only the blocks its window still reads. Blocks are taken as its
steps need them (:meth:`BlockManager.prepare_window`) and released as the window leaves them,
hashed like the main ones, so a prefix hit revives the window's tail too; a hit is as long as both
groups can serve it. Admission reserves the most window blocks a sequence can hold at once
(its window and a chunk), so taking them never fails.
This module never touches tensors: it hands out block ids.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np
import xxhash

from r1kit.infer.sequence import Sequence
from r1kit.model.attention import window_start


class Block:
    __slots__ = ("block_id", "hash", "ref_count", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] | None = None


def chain_hash(token_ids: list[int] | tuple[int, ...], prefix: int) -> int:
    """128-bit hash of a block's token ids after the block whose hash is ``prefix``."""
    h = xxhash.xxh3_128()
    h.update(prefix.to_bytes(16, "little"))
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return h.intdigest()


@dataclass(frozen=True)
class WindowGroup:
    """The window group's shape: ``num_blocks`` blocks of its own; ``compress``, the run length of a
    compressed cache whose runs are pooled from these layers' raw K/V (None: no such cache);
    ``max_chunk``, the most tokens one step computes for a sequence (the scheduler's budget)."""

    num_blocks: int
    compress: int | None
    max_chunk: int

    def span(self, window: int, block_size: int, chunk: int | None = None) -> int:
        """The most blocks a sequence of local window ``window`` holds here at once: from the first
        position it still reads to the end of a chunk (of ``chunk`` tokens at most; default ``max_chunk``)."""
        return (self.reach(window) + (self.max_chunk if chunk is None else chunk)) // block_size + 2

    def keep_from(self, position: int, window: int) -> int:
        """The first position the windowed layers still read once ``position`` is the next to compute:
        the local window's (:func:`~r1kit.model.attention.window_start`) and, with a compressed cache,
        the start of the run not yet pooled."""
        first = window_start(position, window)
        return first if self.compress is None else min(first, position // self.compress * self.compress)

    def reach(self, window: int) -> int:
        """How far behind the next position they read, at most."""
        return max(window, self.compress or 1) - 1


@dataclass
class _WindowTable:
    blocks: list[int] = field(default_factory=list)  # -1: released, the window has left it
    freed: int = 0  # leading entries of blocks that are -1
    hashed: int = 0  # leading blocks whose hash has been registered
    reserved: int = 0  # the most blocks the sequence may hold at once


class BlockManager:
    """``window``: the shape of a window group, for models that have one (see the module's note)."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, window: WindowGroup | None = None) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must be >= 1")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_ids: deque[int] = deque(range(num_blocks))
        self.cached_free: OrderedDict[int, None] = OrderedDict()  # least recently freed first
        self.hash_to_block: dict[int, int] = {}
        self.num_evictions = 0
        # the window group: its own blocks (a manager of its own, whose tables live here, by sequence id)
        self.window = window
        self.window_blocks = BlockManager(window.num_blocks, block_size, enable_prefix_caching) if window is not None else None
        self.window_tables: dict[int, _WindowTable] = {}
        self.window_reserved = 0

    # -- sizes ---------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_ids) + len(self.cached_free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- the protocol the scheduler uses -------------------------------------------------------
    def can_allocate(self, seq: Sequence) -> bool:
        hits, _ = self._match(seq)
        revived = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        if self.window is not None and self.window_reserved + self._window_span(seq, len(hits)) > self.window.num_blocks:
            return False
        return self.blocks_for(seq.num_tokens) - len(hits) <= self.num_free_blocks - revived

    def allocate(self, seq: Sequence) -> None:
        """Give a waiting sequence blocks for all its tokens, reusing cached prefix blocks (and, with a
        window group, reserve its window blocks, reviving the tail of the hit there)."""
        assert not seq.block_table, f"{seq} already holds blocks"
        hits, window_hits = self._match(seq)
        if self.window is not None:
            table = self.window_tables[seq.seq_id] = _WindowTable(reserved=self._window_span(seq, len(hits)))
            self.window_reserved += table.reserved
            table.blocks = [-1] * (len(hits) - len(window_hits)) + [self.window_blocks._revive(b) for b in window_hits]
            table.freed, table.hashed = len(hits) - len(window_hits), len(hits)
        for block_id in hits:
            seq.block_table.append(self._revive(block_id))
            seq.block_hashes.append(self.blocks[block_id].hash)
        seq.num_computed_tokens = len(hits) * self.block_size
        if seq.num_preemptions == 0:
            seq.num_cached_tokens = seq.num_computed_tokens
        while len(seq.block_table) < self.blocks_for(seq.num_tokens):
            seq.block_table.append(self._take().block_id)

    def deallocate(self, seq: Sequence) -> None:
        """Release a sequence's blocks (last block first, so a prefix's tail is evicted before its head)."""
        for block_id in reversed(seq.block_table):
            if block_id >= 0:
                self._release(block_id)
        seq.block_table.clear()
        seq.num_freed_blocks = 0
        seq.block_hashes.clear()
        seq.num_computed_tokens = 0
        table = self.window_tables.pop(seq.seq_id, None)
        if table is not None:
            for block_id in reversed(table.blocks):
                if block_id >= 0:
                    self.window_blocks._release(block_id)
            self.window_reserved -= table.reserved

    def prepare_window(self, seq: Sequence, tokens: int) -> None:
        """Before a step computes ``tokens`` of ``seq``: release the window-group blocks its window has
        left, and take those its new positions need (within its reservation: this never fails)."""
        table = self.window_tables[seq.seq_id]
        end = min(self.window.keep_from(seq.num_computed_tokens, seq.window) // self.block_size, len(table.blocks))
        for k in range(table.freed, end):
            self.window_blocks._release(table.blocks[k])
            table.blocks[k] = -1
        table.freed = max(table.freed, end)
        while len(table.blocks) < self.blocks_for(seq.num_computed_tokens + tokens):
            table.blocks.append(self.window_blocks._take().block_id)
        assert len(table.blocks) - table.freed <= table.reserved, f"{seq} holds more window blocks than it reserved"

    def window_table(self, seq: Sequence) -> list[int]:
        """``seq``'s block table in the window group (-1 where the window has left)."""
        return self.window_tables[seq.seq_id].blocks

    def _window_span(self, seq: Sequence, hit_blocks: int) -> int:
        # its chunks are never longer than what is left to compute after the hit, and it never holds
        # more blocks than it can fill
        chunk = min(self.window.max_chunk, max(1, seq.num_tokens - hit_blocks * self.block_size))
        return min(self.window.span(seq.window, self.block_size, chunk), self.blocks_for(seq.num_prompt_tokens + seq.params.max_tokens))

    def free_before(self, seq: Sequence, position: int) -> None:
        """Release the blocks whose positions all lie before ``position`` (no layer will read them again:
        only for models whose every layer is local). Their table entries become -1."""
        end = min(position // self.block_size, len(seq.block_table))
        for k in range(seq.num_freed_blocks, end):
            self._release(seq.block_table[k])
            seq.block_table[k] = -1
        seq.num_freed_blocks = max(seq.num_freed_blocks, end)

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        assert block.ref_count >= 0, f"block {block_id} freed twice"
        if block.ref_count == 0:
            if block.hash is not None:
                self.cached_free[block_id] = None
            else:
                self.free_ids.append(block_id)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix, in both groups (their K/V came from weights that have changed);
        the blocks sequences hold stay theirs."""
        for manager in (self, self.window_blocks) if self.window_blocks is not None else (self,):
            for block in manager.blocks:
                block.hash = block.token_ids = None
            manager.hash_to_block.clear()
            manager.free_ids.extend(manager.cached_free)
            manager.cached_free.clear()

    def can_append(self, seq: Sequence) -> bool:
        """Whether the slots for all of ``seq``'s tokens (the new one included) can be had."""
        return self.blocks_for(seq.num_tokens) - len(seq.block_table) <= self.num_free_blocks

    def may_append(self, seq: Sequence) -> None:
        while len(seq.block_table) < self.blocks_for(seq.num_tokens):
            seq.block_table.append(self._take().block_id)

    def register_computed(self, seq: Sequence) -> None:
        """Hash the full blocks whose K/V are now computed, so later requests can hit them."""
        if not self.enable_prefix_caching:
            return
        size = self.block_size
        for k in range(len(seq.block_hashes), seq.num_computed_tokens // size):
            tokens = tuple(seq.token_ids[k * size : (k + 1) * size])
            h = chain_hash(tokens, seq.block_hashes[-1] if k else seq.window)
            seq.block_hashes.append(h)
            self._register(seq.block_table[k], h, tokens)
        table = self.window_tables.get(seq.seq_id)
        if table is not None:  # the window group's blocks of the same positions carry the same hashes
            for k in range(max(table.hashed, table.freed), len(seq.block_hashes)):
                self.window_blocks._register(table.blocks[k], seq.block_hashes[k], tuple(seq.token_ids[k * size : (k + 1) * size]))
            table.hashed = len(seq.block_hashes)

    def _register(self, block_id: int, h: int, tokens: tuple[int, ...]) -> None:
        block = self.blocks[block_id]
        if block.hash is None and h not in self.hash_to_block:
            block.hash, block.token_ids = h, tokens
            self.hash_to_block[h] = block.block_id

    # -- internals -----------------------------------------------------------------------------
    def _match(self, seq: Sequence) -> tuple[list[int], list[int]]:
        """(main blocks of the prefix hit, the window group's blocks of its tail): the longest prefix
        both groups hold, leaving at least one token to compute for logits."""
        if not self.enable_prefix_caching or seq.prompt_logprobs is not None:
            return [], []
        size, hits, hashes, prefix = self.block_size, [], [], seq.window
        for k in range((seq.num_tokens - 1) // size):
            tokens = tuple(seq.token_ids[k * size : (k + 1) * size])
            prefix = chain_hash(tokens, prefix)
            block_id = self._cached(prefix, tokens)
            if block_id is None:
                break
            hits.append(block_id)
            hashes.append((prefix, tokens))
        if self.window is None:
            return hits, []
        for h in range(len(hits), 0, -1):  # the window's tail of a hit of h blocks must be cached too
            first = self.window.keep_from(h * size, seq.window) // size
            tail = [self.window_blocks._cached(*hashes[k]) for k in range(first, h)]
            if None not in tail:
                return hits[:h], tail
        return [], []

    def _cached(self, h: int, tokens: tuple[int, ...]) -> int | None:
        block_id = self.hash_to_block.get(h)
        return block_id if block_id is not None and self.blocks[block_id].token_ids == tokens else None

    def _revive(self, block_id: int) -> int:
        """Take a hit block into one more table (out of the cached-free list if nobody held it)."""
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.cached_free[block_id]
        block.ref_count += 1
        return block_id

    def _take(self) -> Block:
        if self.free_ids:
            block = self.blocks[self.free_ids.popleft()]
        else:
            if not self.cached_free:
                raise RuntimeError("KV-cache pool exhausted: the scheduler must check can_allocate/can_append first")
            block_id, _ = self.cached_free.popitem(last=False)  # evict the least recently freed
            block = self.blocks[block_id]
            del self.hash_to_block[block.hash]
            block.hash = block.token_ids = None
            self.num_evictions += 1
        assert block.ref_count == 0
        block.ref_count = 1
        return block

    def check_invariants(self) -> None:
        """Every block in exactly one state; the hash map agrees with the blocks (tests call this)."""
        free, cached = set(self.free_ids), set(self.cached_free)
        assert len(free) == len(self.free_ids) and not free & cached
        for block in self.blocks:
            if block.ref_count > 0:
                assert block.block_id not in free and block.block_id not in cached
            elif block.hash is None:
                assert block.block_id in free
            else:
                assert block.block_id in cached
        for h, block_id in self.hash_to_block.items():
            assert self.blocks[block_id].hash == h
        assert sum(b.hash is not None for b in self.blocks) == len(self.hash_to_block)
        if self.window_blocks is not None:
            self.window_blocks.check_invariants()
            held = [b for t in self.window_tables.values() for b in t.blocks if b >= 0]
            assert sorted(held) == sorted(b.block_id for b in self.window_blocks.blocks for _ in range(b.ref_count))
            assert self.window_reserved == sum(t.reserved for t in self.window_tables.values()) <= self.window.num_blocks
