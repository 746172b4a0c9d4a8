"""Runs the model over one scheduled step's sequences against the paged KV pool, in one forward.

``run(items)`` takes (sequence, tokens to compute) pairs, decodes and prefill chunks alike, packs
their new tokens into one row (a :class:`~r1kit.infer.paged_cache.PackedBatch`: one-token rows
first) and returns the logits of each item's newest token (and, for items that ask for prompt
logprobs, of all its new tokens). One forward per step: a step that mixes prefills with decodes
reads the weights once, not once per kind. A step of decodes alone is already packed ([B, 1]) and
goes straight to a :class:`~r1kit.infer.paged_cache.PagedBatch`, or, on the CPU, up to
:data:`~r1kit.infer.decode_step.MAX_BATCH` of them, to the one-call step
(:class:`~r1kit.infer.decode_step.DecodeStep`) where the model has one: no module, view or small
tensor per layer. It owns the pool; it never decides what to run (the
scheduler) or what to sample (the sampler).
"""

from __future__ import annotations

from typing import Callable

import torch

from r1kit.infer.decode_step import MAX_BATCH, DecodeStep
from r1kit.infer.paged_cache import KVPool, PackedBatch, PagedBatch
from r1kit.infer.sequence import Sequence


class ModelRunner:
    """``window_blocks`` and ``window_tables`` (a sequence's table in that group): the pool's window
    group, for models whose windowed layers have blocks of their own (0 and None otherwise)."""

    def __init__(self, model, num_blocks: int, block_size: int, decode_kernel: bool = True, window_blocks: int = 0,
                 window_tables: Callable[[Sequence], list[int]] | None = None, decode_step: bool = True) -> None:
        self._model = model
        self.window_tables = window_tables
        self.device = model.device
        self._use_step = decode_kernel and decode_step and self.device.type == "cpu"
        kernel = None
        if decode_kernel and self.device.type == "cpu":
            from r1kit.infer.decode_attention import load_kernel

            kernel = load_kernel()
        elif decode_kernel and self.device.type == "cuda":
            from r1kit.infer.triton_decode_attention import load_triton_kernel

            kernel = load_triton_kernel(self.device)
        self.pool = KVPool(model.config, num_blocks, block_size, model.dtype, self.device, kernel, window_blocks)
        self._step: DecodeStep | None | bool = self._use_step  # True: not built yet

    @property
    def model(self):
        return self._model

    @model.setter
    def model(self, model) -> None:
        """New weights (the engine's ``update_weights``): the one-call step will be built over them."""
        self._model = model
        self._step = self._use_step

    @property
    def step(self) -> DecodeStep | None:
        """The one-call step of a few sequences decoding together, None where the model has none. Built
        at its first use: an engine that never runs a step of a few decodes alone (large batches,
        reinforcement learning's updates between steps) never copies its weights into the step's layout."""
        if self._step is True:
            self._step = DecodeStep.build(self._model, self.pool)
        return self._step or None

    @step.setter
    def step(self, step: DecodeStep | None) -> None:
        self._step = step

    @torch.inference_mode()
    def run(self, items: list[tuple[Sequence, int]]) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """(newest-token logits [len(items), V] in ``items``' order, per item the logits [n, V] of all its
        new tokens when it records prompt logprobs, else None)."""
        if all(n == 1 for _, n in items) and not any(self._wants_all(seq) for seq, _ in items):
            return self._run_decode([seq for seq, _ in items]), [None] * len(items)
        order = sorted(range(len(items)), key=lambda i: items[i][1] != 1)  # one-token rows first (stable)
        packed = [items[i] for i in order]
        view = PackedBatch(self.pool, [(seq.block_table, seq.num_computed_tokens, n, seq.window) for seq, n in packed], self.device,
                           self._window_tables([seq for seq, _ in packed]))
        tokens = torch.tensor([t for seq, n in packed for t in seq.token_ids[seq.num_computed_tokens : seq.num_computed_tokens + n]], device=self.device)
        newest = view.last[torch.tensor(order, device=self.device).argsort()]  # each item's newest column, in items' order
        wants_all = [self._wants_all(seq) for seq, _ in items]
        if not any(wants_all):
            return self.model(tokens[None], cache=view, select=newest)[0], [None] * len(items)
        logits = self.model(tokens[None], cache=view)[0]
        ends = newest.tolist()
        full = [logits[ends[i] - n + 1 : ends[i] + 1] if wants_all[i] else None for i, (_, n) in enumerate(items)]
        return logits[newest], full

    def _run_decode(self, seqs: list[Sequence]) -> torch.Tensor:
        if len(seqs) <= MAX_BATCH and self.step is not None:
            return self.step(seqs, self._window_tables(seqs))
        # every row computes one token: [B, 1] is already packed, and the PagedBatch is the whole view
        view = PagedBatch(
            self.pool, [s.block_table for s in seqs], [s.num_computed_tokens for s in seqs], [1] * len(seqs), [s.window for s in seqs], self.device,
            self._window_tables(seqs),
        )
        tokens = torch.tensor([[s.token_ids[s.num_computed_tokens]] for s in seqs], device=self.device)
        return self.model(tokens, cache=view)[:, -1]

    def _window_tables(self, seqs: list[Sequence]) -> list[list[int]] | None:
        return None if self.window_tables is None else [self.window_tables(s) for s in seqs]

    @staticmethod
    def _wants_all(seq: Sequence) -> bool:
        return seq.prompt_logprobs is not None and seq.num_computed_tokens < seq.num_prompt_tokens
