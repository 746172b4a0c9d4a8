"""Continuous batching: which sequences run in the next step, and how many tokens each computes.

Each step has a token budget (``max_num_batched_tokens``) and a sequence cap (``max_num_seqs``).
Decodes go first (one token each, oldest first); what is left of the budget goes to prefills:
sequences part-way through a long prompt first (chunked prefill), then waiting ones, admitted in
arrival order while the block manager can give them their blocks. A prefill batch is padded to its
longest chunk, so its cost is counted as rows × longest chunk. New requests join between steps.

When a decode needs a block and none is left, the newest running sequence is preempted: its blocks
are freed (they stay in the prefix cache until evicted) and it goes back to the front of the queue,
to be recomputed from its tokens later. A request never fails for lack of blocks once admitted:
``add`` refuses, up front, one that could not fit in the whole pool.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from r1kit.infer.block_manager import BlockManager
from r1kit.infer.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    prefills: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, tokens to compute)
    decodes: list[Sequence] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.prefills or self.decodes)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: the last is preempted first
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        # 1. decodes, making room by preemption
        for seq in [s for s in self.running if s.num_uncomputed == 1]:
            if seq.status is not SequenceStatus.RUNNING or len(batch.decodes) >= budget:
                continue  # preempted while making room for an older one, or over budget
            while not self.block_manager.can_append(seq):
                victim = self.running[-1]
                self._preempt(victim)
                if victim in batch.decodes:
                    batch.decodes.remove(victim)
                if victim is seq:
                    break
            else:
                self.block_manager.may_append(seq)
                batch.decodes.append(seq)
        # 2. prefills: running sequences part-way through their prompt, then waiting ones
        budget -= len(batch.decodes)
        longest = 0
        for seq in [s for s in self.running if s.num_uncomputed > 1]:
            longest = self._add_prefill(batch, seq, budget, longest)
            if longest is None:
                return batch
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            chunk = self._chunk(seq, budget, longest, len(batch.prefills), assume_uncomputed=seq.num_tokens)
            if chunk is None or not self.block_manager.can_allocate(seq):
                break
            self.waiting.popleft()
            self.block_manager.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            longest = self._add_prefill(batch, seq, budget, longest)
            if longest is None:
                break
        return batch

    def _chunk(self, seq: Sequence, budget: int, longest: int, rows: int, assume_uncomputed: int | None = None) -> int | None:
        """Tokens ``seq`` may compute in this prefill batch (padded cost ``rows × longest`` within budget)."""
        remaining = seq.num_uncomputed if assume_uncomputed is None else assume_uncomputed
        cap = budget // (rows + 1)  # the widest batch that keeps (rows + 1) × width within budget
        if cap < max(longest, 1):
            return None
        return min(remaining, cap)

    def _add_prefill(self, batch: ScheduledBatch, seq: Sequence, budget: int, longest: int) -> int | None:
        chunk = self._chunk(seq, budget, longest, len(batch.prefills))
        if chunk is None:
            return None
        batch.prefills.append((seq, chunk))
        return max(longest, chunk)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.deallocate(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Release a sequence that has ended (or been aborted), wherever it is."""
        if seq in self.running:
            self.running.remove(seq)
            self.block_manager.deallocate(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
