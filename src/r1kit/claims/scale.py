"""How big every experiment is, derived from the time budget and the device.

The budget in minutes is turned into *effective CPU minutes* (a CUDA device counts as
``GPU_SPEEDUP`` 2-core CPU minutes each) and the effective minutes pick a tier:

=============  ========  ====================  ===========  =====  ==============  ==========================
effective min  hidden    layers/heads/kv/ffn   train len    seeds  speed lengths   GPTQ calib / eval tokens
=============  ========  ====================  ===========  =====  ==============  ==========================
< 3 (tests)    32        2 / 2 / 1 / 96        128          1      256, 512        2×32 / 2×64
< 20           64        2 / 4 / 2 / 192       512          1      1K-4K           16×256 / 8×256
< 120 (60 min) 128       4 / 4 / 2 / 384       1024         2      1K-16K          64×512 / 16×512
≥ 120          256       6 / 8 / 2 / 768       2048         3      1K-16K          128×1024 / 32×1024
=============  ========  ====================  ===========  =====  ==============  ==========================

Training steps are not in the table: each experiment times a few steps of its slowest model and
gives every model of the comparison the same number of steps that fits its share of the budget
(``SHARES``), so the compared models always see the same tokens. This module must never run anything.
"""

from __future__ import annotations

import dataclasses

from r1kit.errors import ConfigError

GPU_SPEEDUP = 20.0  # one CUDA minute trains roughly as much as this many 2-core CPU minutes at these sizes
SHARES = {"attention": 0.45, "sparsity": 0.35, "gptq": 0.15, "intent": 0.0, "hardware": 0.05}
# Part of an experiment's share kept for what is not training: evaluation, speed runs, checkpoint writes.
TRAIN_FRACTION = 0.7


@dataclasses.dataclass(frozen=True)
class Scale:
    """Sizes of one claims run (see the module docstring for how the budget picks them)."""

    budget_minutes: float
    effective_minutes: float
    tier: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    seq_len: int
    seeds: int
    speed_lengths: tuple[int, ...]
    vocab_size: int
    corpus_slice: tuple[str, ...]  # stdlib folders to read; empty: the whole embedded corpus
    gptq_nsamples: int
    gptq_seqlen: int
    eval_blocks: int
    eval_len: int
    micro_batch_size: int

    def minutes_for(self, experiment: str) -> float:
        """The wall-clock minutes this experiment may use."""
        return self.budget_minutes * SHARES[experiment]

    def train_seconds(self, experiment: str, runs: int) -> float:
        """Seconds of training each of ``runs`` training runs of ``experiment`` may take."""
        return 60 * self.minutes_for(experiment) * TRAIN_FRACTION / max(runs, 1)


_TIERS = (
    # (below effective minutes, tier name, fields)
    (3.0, "tiny", dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=96, seq_len=128, seeds=1,
                       speed_lengths=(256, 512), vocab_size=512, corpus_slice=("json", "http", "email"), gptq_nsamples=2,
                       gptq_seqlen=32, eval_blocks=2, eval_len=64, micro_batch_size=4)),
    (20.0, "small", dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=192, seq_len=512, seeds=1,
                         speed_lengths=(1024, 2048, 4096), vocab_size=4096, corpus_slice=(), gptq_nsamples=16, gptq_seqlen=256,
                         eval_blocks=8, eval_len=256, micro_batch_size=8)),
    (120.0, "default", dict(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=384, seq_len=1024, seeds=2,
                            speed_lengths=(1024, 2048, 4096, 8192, 16384), vocab_size=8192, corpus_slice=(), gptq_nsamples=64,
                            gptq_seqlen=512, eval_blocks=16, eval_len=512, micro_batch_size=8)),
    (float("inf"), "large", dict(hidden_size=256, num_layers=6, num_heads=8, num_kv_heads=2, intermediate_size=768, seq_len=2048, seeds=3,
                                 speed_lengths=(1024, 2048, 4096, 8192, 16384), vocab_size=8192, corpus_slice=(), gptq_nsamples=128,
                                 gptq_seqlen=1024, eval_blocks=32, eval_len=1024, micro_batch_size=8)),
)


def scale_for(budget_minutes: float, cuda: bool) -> Scale:
    """The sizes a budget of ``budget_minutes`` allows on this device (``cuda``: a GPU is present)."""
    if not budget_minutes > 0:
        raise ConfigError(f"--budget-minutes={budget_minutes} must be positive (the default, 60, fits a 2-core CPU)", param="budget_minutes")
    effective = budget_minutes * (GPU_SPEEDUP if cuda else 1.0)
    _, tier, fields = next(t for t in _TIERS if effective < t[0])
    return Scale(budget_minutes=budget_minutes, effective_minutes=effective, tier=tier, **fields)
