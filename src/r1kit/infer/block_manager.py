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
This module never touches tensors: it hands out block ids.
"""

from __future__ import annotations

from collections import OrderedDict, deque

import numpy as np
import xxhash

from r1kit.infer.sequence import Sequence


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


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must be >= 1")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_ids: deque[int] = deque(range(num_blocks))
        self.cached_free: OrderedDict[int, None] = OrderedDict()  # least recently freed first
        self.hash_to_block: dict[int, int] = {}
        self.num_evictions = 0

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
        hits = self._match_prefix(seq)
        revived = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        return self.blocks_for(seq.num_tokens) - len(hits) <= self.num_free_blocks - revived

    def allocate(self, seq: Sequence) -> None:
        """Give a waiting sequence blocks for all its tokens, reusing cached prefix blocks."""
        assert not seq.block_table, f"{seq} already holds blocks"
        hits = self._match_prefix(seq)
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.cached_free[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
            seq.block_hashes.append(block.hash)
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
            block = self.blocks[seq.block_table[k]]
            if block.hash is None and h not in self.hash_to_block:
                block.hash, block.token_ids = h, tokens
                self.hash_to_block[h] = block.block_id

    # -- internals -----------------------------------------------------------------------------
    def _match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding a prefix of ``seq`` (leaving at least one token to compute for logits)."""
        if not self.enable_prefix_caching or seq.prompt_logprobs is not None:
            return []
        size, hits, prefix = self.block_size, [], seq.window
        for k in range((seq.num_tokens - 1) // size):
            tokens = tuple(seq.token_ids[k * size : (k + 1) * size])
            prefix = chain_hash(tokens, prefix)
            block_id = self.hash_to_block.get(prefix)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            hits.append(block_id)
        return hits

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
