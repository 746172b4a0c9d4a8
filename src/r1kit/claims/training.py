"""Training and measuring the experiments' small models, through r1kit's own trainer and evaluation.

``plan_steps`` times a few optimizer steps of the slowest model of a comparison so that every model
gets the same number of steps (the same tokens) within the experiment's share of the budget.
``train`` runs :class:`r1kit.train.trainer.Trainer` with ``resume=True``: an interrupted run
continues from its last checkpoint, a finished one (``summary.json``) is not trained again.
``measure`` is perplexity overall and by position (:func:`r1kit.evaluate.perplexity`) plus
next-token accuracy, cached in the run's ``eval.json``. This module must never choose what to compare.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from r1kit.claims.scale import Scale
from r1kit.config import ModelConfig, dump_json
from r1kit.model.sparsity import SparsityControl

LR, MIN_LR = 3e-3, 3e-4  # the tiny-cpu recipe: small models trained for minutes need a high rate
PROBE_STEPS = 2


def step_seconds(config: ModelConfig, seq_len: int, batch: int, device: torch.device) -> float:
    """Seconds of one AdamW training step of ``config`` on ``batch`` blocks of ``seq_len`` (after a warm-up step)."""
    from r1kit.model.transformer import R1kitForCausalLM

    torch.manual_seed(0)
    model = R1kitForCausalLM(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, config.vocab_size, (batch, seq_len + 1), device=device)

    def one_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        logits = model(tokens[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        optimizer.step()

    one_step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(PROBE_STEPS):
        one_step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / PROBE_STEPS


def plan_steps(configs: list[ModelConfig], scale: Scale, seconds: float, device: torch.device, plan_file: Path, floor: int = 4) -> int:
    """Steps that the slowest of ``configs`` completes in ``seconds`` (at least ``floor``).

    Kept in ``plan_file`` on first use, so a resumed experiment trains every model to the same step
    count as before the interruption."""
    if Path(plan_file).is_file():
        return int(json.loads(Path(plan_file).read_text())["steps"])
    slowest = max(step_seconds(c, scale.seq_len, scale.micro_batch_size, device) for c in configs)
    steps = max(floor, int(seconds / slowest))
    Path(plan_file).parent.mkdir(parents=True, exist_ok=True)
    dump_json({"steps": steps, "slowest_step_seconds": slowest, "seconds": seconds}, plan_file)
    return steps


def train(run_dir: Path, model_config: ModelConfig | None, shards: Path, scale: Scale, steps: int, seed: int,
          init_from: Path | None = None, control: SparsityControl | None = None, lr: float = LR,
          log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train (or resume, or reuse) one run; returns the trainer's summary (``model``: the exported directory)."""
    from r1kit.train.config import TrainConfig
    from r1kit.train.trainer import Trainer

    summary_file = Path(run_dir) / "summary.json"
    if summary_file.is_file() and (Path(run_dir) / "model" / "config.json").is_file():
        return json.loads(summary_file.read_text())
    config = TrainConfig(
        data=str(shards), out=str(run_dir), init_from=str(init_from) if init_from else None, seq_len=scale.seq_len,
        micro_batch_size=scale.micro_batch_size, max_steps=steps, lr=lr, min_lr=lr / 10, warmup_steps=max(1, min(50, steps // 10)),
        sparsity_control=control, eval_every=0, eval_batches=2, log_every=max(1, steps // 20), save_every=max(25, steps // 4), keep_last=1,
        seed=seed,
    )  # fmt: skip
    return Trainer(None if init_from else model_config, config, resume=True, log=log).run()


def held_out_blocks(shards: Path, model_dir: Path, seq_len: int, max_blocks: int) -> np.ndarray:
    """Long held-out sequences: the first ``max_blocks`` val blocks of ``seq_len`` + 1 tokens."""
    from r1kit.evaluate import blocks_from

    return blocks_from(str(shards), str(model_dir), seq_len, max_blocks)


@torch.inference_mode()
def next_token_accuracy(model, blocks: np.ndarray, batch_size: int) -> float:
    """Share of positions whose most likely next token (argmax of the logits) is the true one."""
    right, total = 0, 0
    for lo in range(0, len(blocks), batch_size):
        batch = torch.from_numpy(blocks[lo : lo + batch_size]).to(model.device)
        predicted = model(batch[:, :-1]).argmax(-1)
        right += int((predicted == batch[:, 1:]).sum())
        total += predicted.numel()
    return right / max(total, 1)


def quality(model, blocks: np.ndarray, buckets: int, batch_size: int = 4) -> dict[str, Any]:
    """Perplexity (overall and by position bucket) and next-token accuracy of ``model`` on ``blocks``."""
    from r1kit.evaluate import perplexity

    model.eval()
    return {**perplexity(model, blocks, buckets=buckets, batch_size=batch_size), "accuracy": next_token_accuracy(model, blocks, batch_size)}


def measure(run_dir: Path, model_dir: Path, blocks: np.ndarray, buckets: int) -> dict[str, Any]:
    """:func:`quality` of the model in ``model_dir``, cached in ``<run_dir>/eval.json``."""
    from r1kit.checkpoints import load_model

    cache = Path(run_dir) / "eval.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    result = quality(load_model(model_dir, dtype=torch.float32), blocks, buckets)
    dump_json(result, cache)
    return result


def undertrained(ppl: float, unigram_ppl: float) -> str | None:
    """Why no quality verdict can be drawn from a model that has not beaten the unigram baseline, else None."""
    if ppl < unigram_ppl:
        return None
    return (f"the models did not train long enough to beat the unigram baseline (perplexity {ppl:.1f} vs {unigram_ppl:.1f}), "
            "so their differences say nothing about the design: raise --budget-minutes")


def spread(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value), min and max of ``values``."""
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean()), "std": float(array.std(ddof=1)) if len(array) > 1 else 0.0,
            "min": float(array.min()), "max": float(array.max()), "n": len(array)}  # fmt: skip
