"""GRPO throughput and effect: rollout and training tokens/s per step, the time split between
generation and learning, and held-out accuracy before and after a short run of a recipe.

    python benchmarks/bench_grpo.py [--model smollm2-135m-instruct] [--config configs/grpo-cpu.yaml] [--steps 4]

The peer for the rollouts, measured in the same run on the same prompts: the plain decoding loop
(``r1kit.infer.generate``: one sequence at a time over a contiguous KV cache, what a trainer without
an inference engine does, as TRL's ``model.generate`` path), so the printed ratio is what sampling on
r1kit's engine (continuous batching, paged KV cache, prefix sharing of the group's prompt, packed
weights) buys. Timings on a shared CPU are noisy: compare the ratios, which come from the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from r1kit.infer.generate import generate
from r1kit.reason.config import GRPO_SECTIONS, load_sections
from r1kit.reason.grpo import GRPOTrainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--config", default="configs/grpo-cpu.yaml")
    parser.add_argument("--steps", type=int, default=4, help="GRPO steps of the recipe to run")
    parser.add_argument("--out", default=None, help="run folder (default: a temporary one)")
    args = parser.parse_args()
    os.environ.setdefault("R1KIT_NO_PROGRESS", "1")
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_grpo_")) / "run"
    sections = load_sections(args.config, GRPO_SECTIONS, {"grpo": {"max_steps": args.steps, "max_minutes": None, "eval_every": 0, "save_every": 10**6}})
    trainer = GRPOTrainer(args.model, sections["task"], sections["grpo"], sections["optim"], out, log=lambda _: None)
    c = trainer.config

    # the peer: one step's worth of one prompt's group, sampled one sequence at a time by the reference loop
    problem = trainer.task.train(0)
    prompt = trainer.encode(trainer.prompt_text(problem))
    params = trainer._params(greedy=False)
    engine_start = time.perf_counter()
    engine_rollouts = trainer.rollouts.generate([prompt], c.group_size, params, seed=0)
    engine_s = time.perf_counter() - engine_start
    engine_tokens = sum(len(r.completion_ids) for r in engine_rollouts)
    policy = trainer.run.base.eval()
    eos = sorted(trainer.rollouts.engine.special.eos)
    ref_start, ref_tokens = time.perf_counter(), 0
    with torch.inference_mode():
        for i in range(c.group_size):
            ref_tokens += len(generate(policy, prompt, params.replace(seed=i), eos))
    ref_s = time.perf_counter() - ref_start
    policy.train()

    summary = trainer.train()
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "rollout_tokens_per_s" in s]
    print(f"model {args.model}, config {args.config}: {len(steps)} steps of {c.prompts_per_step} prompts x {c.group_size} completions")
    print(f"{'step':>4} {'rollout tok/s':>14} {'train tok/s':>12} {'gen s':>8} {'learn s':>8} {'reward':>7} {'acc':>6}")
    for s in steps:
        print(f"{s['step']:>4} {s['rollout_tokens_per_s']:>14.1f} {s['train_tokens_per_s']:>12.1f} {s['generation_s']:>8.1f} {s['learning_s']:>8.1f} "
              f"{s['reward_mean']:>7.3f} {s['accuracy']:>6.3f}")  # fmt: skip
    gen = sum(s["generation_s"] for s in steps)
    learn = sum(s["learning_s"] for s in steps)
    print(f"time split: generation {gen / (gen + learn):.0%}, learning {learn / (gen + learn):.0%}")
    engine_rate, ref_rate = engine_tokens / engine_s, ref_tokens / ref_s
    print(f"one group of {c.group_size}: engine {engine_rate:.1f} tok/s, reference loop {ref_rate:.1f} tok/s -> ratio {engine_rate / ref_rate:.2f}x")
    print(f"held-out accuracy {summary['heldout_accuracy_before']:.3f} -> {summary['heldout_accuracy']:.3f}, "
          f"reward {summary['heldout_reward_before']:.3f} -> {summary['heldout_reward']:.3f} after {summary['steps']} steps")  # fmt: skip


if __name__ == "__main__":
    main()
