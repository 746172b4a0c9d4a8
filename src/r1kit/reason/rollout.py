"""Rollouts: G completions of each prompt sampled on r1kit's engine from the current policy, with the
log-probability of every sampled token.

One :class:`RolloutEngine` lives for a whole run. Before each batch of rollouts it takes the policy's
weights with :meth:`~r1kit.infer.engine.LLMEngine.update_weights` (the engine, its KV pool and its
compiled kernels are kept; only the weights change), so completions always come from the policy as
it is now. Sampling is seeded per (step, prompt), so a resumed run draws what the uninterrupted run
drew. This module never computes a loss or a reward.
"""

from __future__ import annotations

import dataclasses

import torch

from r1kit.infer.llm import LLM
from r1kit.infer.sampling import SamplingParams


@dataclasses.dataclass
class Rollout:
    """One sampled completion of prompt ``prompt_index`` (its place in the batch)."""

    prompt_index: int
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]  # the engine's log π_old of each completion token (its raw distribution)
    text: str
    finish_reason: str | None


class RolloutEngine:
    """The engine that samples a run's completions. ``engine_args``: :class:`~r1kit.infer.engine.EngineConfig` fields."""

    def __init__(self, policy, tokenizer, max_model_len: int, max_num_seqs: int, **engine_args) -> None:
        self.llm = LLM(policy, tokenizer, max_model_len=max_model_len, max_num_seqs=max_num_seqs, **engine_args)

    @property
    def engine(self):
        return self.llm.llm_engine

    def sync(self, policy: torch.nn.Module) -> None:
        """Load the policy's current weights into the engine (same engine object)."""
        self.engine.update_weights(policy)

    def generate(self, prompts: list[list[int]], group_size: int, params: SamplingParams, seed: int) -> list[Rollout]:
        """``group_size`` completions of each prompt (token ids), prompt by prompt, completions of one
        prompt side by side; prompt ``i`` is sampled with seed ``seed + i·group_size`` (+ its index)."""
        requests = [params.replace(n=group_size, logprobs=0, seed=(seed + i * group_size) % 2**63) for i in range(len(prompts))]
        outputs = self.llm.generate(prompts, requests)
        rollouts = []
        for i, (prompt, out) in enumerate(zip(prompts, outputs)):
            for completion in sorted(out.outputs, key=lambda c: c.index):
                logprobs = [entry[token].logprob for token, entry in zip(completion.token_ids, completion.logprobs)]
                rollouts.append(Rollout(i, list(prompt), list(completion.token_ids), logprobs, completion.text, completion.finish_reason))
        return rollouts
