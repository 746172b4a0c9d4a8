"""Runs the model over one scheduled group of sequences against the paged KV pool.

``run(items)`` takes (sequence, tokens to compute) pairs, builds the left-padded token and position
tensors and a :class:`~r1kit.infer.paged_cache.PagedBatch` view, and returns the logits of each
row's newest token (and, when a row asks for prompt logprobs, of all its new tokens). It owns the
pool; it never decides what to run (the scheduler) or what to sample (the sampler).
"""

from __future__ import annotations

import torch

from r1kit.infer.paged_cache import KVPool, PagedBatch
from r1kit.infer.sequence import Sequence


class ModelRunner:
    def __init__(self, model, num_blocks: int, block_size: int) -> None:
        self.model = model
        self.device = model.device
        self.pool = KVPool(model.config, num_blocks, block_size, model.dtype, self.device)

    @torch.inference_mode()
    def run(self, items: list[tuple[Sequence, int]]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(last-token logits [B, V], all-position logits [B, m, V] or None)."""
        starts = [seq.num_computed_tokens for seq, _ in items]
        lengths = [n for _, n in items]
        m = max(lengths)
        rows = [[0] * (m - n) + seq.token_ids[s : s + n] for (seq, n), s in zip(items, starts)]
        view = PagedBatch(
            self.pool,
            [seq.block_table for seq, _ in items],
            starts,
            lengths,
            [seq.window for seq, _ in items],
            self.device,
        )
        tokens = torch.tensor(rows, device=self.device)
        full = any(seq.prompt_logprobs is not None and seq.num_computed_tokens < seq.num_prompt_tokens for seq, _ in items)
        logits = self.model(tokens, positions=view.positions, cache=view, window=view.window, last_only=not full)
        return logits[:, -1], (logits if full else None)
