"""Rank 0's word to the workers: one broadcast per message, each step's metadata as integers.

The scheduler and the block manager live on rank 0 only; a worker holds no request state. Each
step rank 0 sends what the workers' :class:`~r1kit.infer.model_runner.ModelRunner` reads of each
scheduled sequence (its new token ids, first position, block tables, window, and whether it wants
every position's logits), and the workers run their shard over it. A message is one broadcast of a
fixed-size int64 buffer; one that does not fit is announced by a broadcast of its size, after which
both sides grow the buffer (never shrinking it), so a step costs one broadcast once sizes settle.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

GROW, STEP, POOL, STOP = 0, 1, 2, 3
CAPACITY = 1024  # int64s: a decode step of a few dozen short sequences fits


class StepChannel:
    """Rank 0 :meth:`send` s, the other ranks :meth:`receive` the same messages in the same order.
    ``seconds``: wall time rank 0 spent in the broadcasts."""

    def __init__(self, group: dist.ProcessGroup, capacity: int = CAPACITY) -> None:
        self.group = group
        self.buffer = torch.zeros(capacity, dtype=torch.int64)
        self.seconds = 0.0

    def send(self, command: int, payload: list[int]) -> None:
        message = [command, len(payload), *payload]
        if len(message) > self.buffer.numel():
            self.buffer[:2] = torch.tensor([GROW, len(message)])
            self._broadcast()
            self._grow(len(message))
        self.buffer[: len(message)] = torch.tensor(message, dtype=torch.int64)
        self._broadcast()

    def receive(self) -> tuple[int, list[int]]:
        """The next (command, payload); waits as long as rank 0 is idle."""
        while True:
            self._broadcast()
            command, length = self.buffer[:2].tolist()
            if command != GROW:
                return command, self.buffer[2 : 2 + length].tolist()
            self._grow(length)

    def _grow(self, needed: int) -> None:
        self.buffer = torch.zeros(max(needed, 2 * self.buffer.numel()), dtype=torch.int64)

    def _broadcast(self) -> None:
        started = time.perf_counter()
        dist.broadcast(self.buffer, group=self.group, group_src=0)
        self.seconds += time.perf_counter() - started


@dataclass
class PoolShape:
    """What a worker's ModelRunner is built with, besides its shard (the engine's choices on rank 0)."""

    num_blocks: int
    block_size: int
    decode_kernel: bool
    window_blocks: int
    window_tables: bool

    def encode(self) -> list[int]:
        return [self.num_blocks, self.block_size, int(self.decode_kernel), self.window_blocks, int(self.window_tables)]

    @classmethod
    def decode(cls, payload: list[int]) -> PoolShape:
        num_blocks, block_size, kernel, window_blocks, tables = payload
        return cls(num_blocks, block_size, bool(kernel), window_blocks, bool(tables))


class _Tail:
    """``token_ids`` of a sequence as far as a step reads them: the ``tokens`` from position ``start`` on."""

    __slots__ = ("start", "tokens")

    def __init__(self, start: int, tokens: list[int]) -> None:
        self.start, self.tokens = start, tokens

    def __getitem__(self, key):
        if isinstance(key, slice):
            return self.tokens[key.start - self.start : key.stop - self.start]
        return self.tokens[key - self.start]


class StepRow:
    """A worker's stand-in for a scheduled :class:`~r1kit.infer.sequence.Sequence`: the fields a
    ModelRunner reads of it, and nothing of the request."""

    __slots__ = ("block_table", "num_computed_tokens", "window", "token_ids", "prompt_logprobs", "num_prompt_tokens", "window_table")

    def __init__(self, block_table: list[int], start: int, window: int, tokens: list[int], wants_all: bool,
                 window_table: list[int] | None) -> None:
        self.block_table, self.num_computed_tokens, self.window = block_table, start, window
        self.token_ids = _Tail(start, tokens)
        # ModelRunner asks for every position's logits where prompt logprobs are recorded and the prompt is not done
        self.prompt_logprobs = [] if wants_all else None
        self.num_prompt_tokens = start + len(tokens) if wants_all else 0
        self.window_table = window_table


def encode_step(items: list, wants_all: list[bool], window_tables: list[list[int]] | None) -> list[int]:
    """``items`` ((sequence, new tokens) pairs, as ModelRunner.run takes them) as integers."""
    out = [len(items)]
    for i, (seq, n) in enumerate(items):
        start = seq.num_computed_tokens
        out += [n, start, seq.window, int(wants_all[i]), len(seq.block_table), *seq.block_table]
        table = window_tables[i] if window_tables is not None else None
        out += [-1] if table is None else [len(table), *table]
        out += seq.token_ids[start : start + n]
    return out


def decode_step(payload: list[int]) -> list[tuple[StepRow, int]]:
    """The inverse of :func:`encode_step`: (stand-in, new tokens) pairs."""
    count, at = payload[0], 1
    items = []
    for _ in range(count):
        n, start, window, wants_all, blocks = payload[at : at + 5]
        at += 5
        table = payload[at : at + blocks]
        at += blocks
        length = payload[at]
        at += 1
        window_table = None if length < 0 else payload[at : at + length]
        at += max(length, 0)
        tokens = payload[at : at + n]
        at += n
        items.append((StepRow(table, start, window, tokens, bool(wants_all), window_table), n))
    return items
