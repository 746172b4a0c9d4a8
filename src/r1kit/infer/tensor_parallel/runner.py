"""Rank 0's model runner under tensor parallelism: ModelRunner's ``run(items)``, each step first sent
to the workers (one broadcast), then run over rank 0's shard while they run theirs; the collectives
inside the model keep the ranks together, and the logits arrive on rank 0 only.

The block tables it sends index every rank's pool alike: blocks are allocated, freed (an abort, a
finished request) and cached on rank 0 alone, and no worker keeps anything between steps.
"""

from __future__ import annotations

from typing import Callable

import torch

from r1kit.infer.model_runner import ModelRunner
from r1kit.infer.sequence import Sequence
from r1kit.infer.tensor_parallel.channel import POOL, STEP, PoolShape, encode_step


class TensorParallelRunner:
    def __init__(self, workers, model, num_blocks: int, block_size: int, decode_kernel: bool = True, window_blocks: int = 0,
                 window_tables: Callable[[Sequence], list[int]] | None = None, decode_step: bool = True) -> None:
        self.workers = workers
        self.window_tables = window_tables
        workers.send(POOL, PoolShape(num_blocks, block_size, decode_kernel, window_blocks, window_tables is not None).encode())
        # a shard is not a model the one-call step runs (DecodeStep.build says so): decode_step changes nothing here
        self.inner = ModelRunner(model, num_blocks, block_size, decode_kernel, window_blocks, window_tables, decode_step)

    @property
    def model(self):
        return self.inner.model

    @property
    def pool(self):
        return self.inner.pool

    def run(self, items: list[tuple[Sequence, int]]) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """ModelRunner.run's results, computed by every rank together."""
        tables = None if self.window_tables is None else [self.window_tables(seq) for seq, _ in items]
        self.workers.send(STEP, encode_step(items, [ModelRunner._wants_all(seq) for seq, _ in items], tables))
        try:
            return self.inner.run(items)
        except RuntimeError as exc:  # a collective failed: a peer died or hung
            raise self.workers.lost(exc) from exc
