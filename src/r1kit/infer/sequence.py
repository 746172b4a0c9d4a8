"""One sequence of a request: its tokens, how many of them have K/V in the cache, and its blocks.

A request with ``n > 1`` has ``n`` sequences that share the prompt. The scheduler, the block
manager and the engine all read and move these fields; a sequence never touches the cache itself.
The invariant: ``token_ids[:num_computed_tokens]`` have K/V in the blocks of ``block_table``; the
rest (the prompt's uncomputed part, or the one token sampled last) are what the next step computes.
"""

from __future__ import annotations

import enum
import itertools
from typing import Any

import torch

from r1kit.infer.sampling import SamplingParams

_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(
        self,
        request_id: str,
        index: int,
        prompt_token_ids: list[int],
        params: SamplingParams,
        window: int,
        generator: torch.Generator | None = None,
        in_reasoning: bool = False,
    ) -> None:
        self.seq_id = next(_ids)
        self.request_id, self.index, self.params = request_id, index, params
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.window = window  # the local-attention window, fixed by the prompt's length for the sequence's life
        self.generator = generator
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0  # tokens whose K/V are in the cache
        self.num_cached_tokens = 0  # prompt tokens the prefix cache served at first admission
        self.num_preemptions = 0
        self.block_table: list[int] = []  # -1: a block freed because no layer's window reaches it
        self.num_freed_blocks = 0  # leading entries of block_table that are -1
        self.block_hashes: list[int] = []  # chained hashes of the leading full blocks, once computed
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        # outputs
        self.text = ""
        self.visible_ids: list[int] = []  # output ids that appear in the text
        self.prefix_offset = self.read_offset = 0  # incremental detokenizer state over visible_ids
        self.emitted_tokens = self.emitted_chars = 0  # what the last streamed delta ended at
        self.logprobs: list[dict[int, Any]] | None = [] if params.logprobs is not None else None
        self.cumulative_logprob = 0.0
        self.prompt_logprobs: list[dict[int, Any] | None] | None = [None] if params.prompt_logprobs is not None else None
        self.in_reasoning = in_reasoning
        self.reasoning_tokens = 0
        # where the output is in its grammar (r1kit.infer.structured.GrammarState), when it must match one
        self.grammar: Any = None

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id}#{self.index}, tokens={self.num_tokens}, computed={self.num_computed_tokens}, "
            f"blocks={self.block_table}, {self.status.value})"
        )
