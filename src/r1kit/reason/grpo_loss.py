"""GRPO's objective as pure functions of tensors: group-normalised advantages, the clipped
policy-ratio term, the k3 estimate of the KL to a frozen reference, and how per-token losses are
aggregated into one number.

DeepSeekMath's GRPO (and R1's) maximises, for each prompt's group of G sampled completions,

    1/G Σ_i 1/|o_i| Σ_t [ min(ρ_it·A_i, clip(ρ_it, 1-ε_low, 1+ε_high)·A_i) - β·KL_k3(π_θ ‖ π_ref)_it ]

with ρ = π_θ/π_old per token and A_i = (r_i - mean(r)) / std(r) over the group. Dr. GRPO drops the
std (``scale_rewards=False``) and the 1/|o_i| (aggregation ``seq-mean-token-sum``); DAPO and TRL's
default average over every token of the batch instead (``token-mean``). The names of the
aggregations are verl's. Nothing here samples, runs a model or knows a tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from r1kit.errors import ConfigError

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """Each completion's reward minus its group's mean, divided by the group's (unbiased) standard
    deviation when ``scale`` (GRPO) or not (Dr. GRPO). ``rewards``: [num_prompts · group_size], the
    completions of one prompt side by side. A group whose rewards are all equal gets advantage 0."""
    if group_size < 2:
        raise ConfigError(f"group_size={group_size}: GRPO compares completions of the same prompt, so it needs at least 2", param="group_size")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    groups = rewards.float().view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    return centred.flatten()


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimate of KL(π_θ ‖ π_ref) per sampled token: ``e^d - d - 1`` with
    ``d = log π_ref - log π_θ``; unbiased, and never negative."""
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str, total_tokens: float | None = None,
              total_seqs: float | None = None) -> torch.Tensor:
    """One loss from per-token losses [B, T] over the completion tokens ``mask`` [B, T]:

    * ``token-mean``: the sum over every token of the batch divided by the number of tokens;
    * ``seq-mean-token-mean``: each sequence's mean over its tokens, averaged over sequences;
    * ``seq-mean-token-sum``: each sequence's sum over its tokens, averaged over sequences.

    ``total_tokens`` / ``total_seqs``: the denominators of the whole batch when this is one
    micro-batch of it, so that the micro-batches' losses add up to the batch's."""
    if mode not in AGGREGATIONS:
        raise ConfigError(f"loss aggregation {mode!r} is not one of {AGGREGATIONS}", param="aggregation")
    mask = mask.to(per_token.dtype)
    masked = per_token * mask
    if mode == "token-mean":
        return masked.sum() / max(float(total_tokens if total_tokens is not None else mask.sum()), 1.0)
    per_seq = masked.sum(dim=1)
    if mode == "seq-mean-token-mean":
        per_seq = per_seq / mask.sum(dim=1).clamp_min(1.0)
    return per_seq.sum() / max(float(total_seqs if total_seqs is not None else per_token.shape[0]), 1.0)


@dataclass
class LossParts:
    """The loss and what is logged about it (each a tensor; the statistics carry no gradient)."""

    loss: torch.Tensor
    kl: torch.Tensor  # mean k3 KL per completion token (0 without a reference)
    clip_fraction: torch.Tensor  # share of completion tokens whose clipped term was the one taken
    ratio_mean: torch.Tensor


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    beta: float = 0.0,
    ref_logprobs: torch.Tensor | None = None,
    aggregation: str = "token-mean",
    total_tokens: float | None = None,
    total_seqs: float | None = None,
) -> LossParts:
    """The GRPO loss (to minimise) of completions whose sampled tokens have ``logprobs`` [B, T] under the
    policy being trained, ``old_logprobs`` under the policy that sampled them and ``ref_logprobs``
    under the frozen reference (needed when ``beta`` > 0); ``advantages``: [B]; ``mask``: [B, T],
    true on completion tokens. ``clip_high``: DAPO's separate upper bound (default ``clip_low``)."""
    if beta > 0 and ref_logprobs is None:
        raise ValueError("beta > 0 needs the reference model's logprobs")
    clip_high = clip_low if clip_high is None else clip_high
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages[:, None].to(logprobs.dtype)
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    kl = kl_k3(logprobs, ref_logprobs) if beta > 0 else torch.zeros_like(logprobs)
    if beta > 0:
        per_token = per_token + beta * kl
    loss = aggregate(per_token, mask, aggregation, total_tokens, total_seqs)
    with torch.no_grad():
        m = mask.to(logprobs.dtype)
        n = m.sum().clamp_min(1.0)
        stats = {
            "kl": (kl * m).sum() / n,
            "clip_fraction": ((clipped < unclipped).to(m.dtype) * m).sum() / n,
            "ratio_mean": (ratio * m).sum() / n,
        }
    return LossParts(loss=loss, **stats)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[target]`` per position: [B, T, V] logits and [B, T] targets -> [B, T] (float32)."""
    return logits.float().log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """The entropy (nats) of each position's next-token distribution: [B, T, V] -> [B, T]."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)
