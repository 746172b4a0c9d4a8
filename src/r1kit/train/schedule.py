"""The learning rate as a pure function of the step: linear warm-up, then cosine decay to ``min_lr``."""

from __future__ import annotations

import math


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based).

    Warm-up rises linearly from lr/warmup to lr over ``warmup_steps`` steps; the cosine then falls
    from lr to ``min_lr`` at ``total_steps`` and stays there.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
