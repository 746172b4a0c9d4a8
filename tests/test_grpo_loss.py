"""GRPO's loss and advantages against a slow reference written from the DeepSeekMath/R1 formula
(explicit loops over groups, sequences and tokens), for each aggregation, with clipping and the k3 KL."""

import math

import pytest
import torch

from r1kit.reason.grpo_loss import AGGREGATIONS, aggregate, group_advantages, grpo_loss


def reference_advantages(rewards: list[float], group: int, scale: bool, eps: float = 1e-4) -> list[float]:
    out = []
    for g in range(0, len(rewards), group):
        rs = rewards[g : g + group]
        mean = sum(rs) / group
        std = math.sqrt(sum((r - mean) ** 2 for r in rs) / (group - 1))
        out += [(r - mean) / (std + eps) if scale else r - mean for r in rs]
    return out


def reference_loss(logp, old, ref, adv, mask, eps_low, eps_high, beta, mode):
    """-J(θ) token by token: min(ρA, clip(ρ)A) - β·(π_ref/π_θ - log(π_ref/π_θ) - 1), then aggregated."""
    per_seq_sum, per_seq_count = [], []
    for i in range(len(logp)):
        total, count = 0.0, 0
        for t in range(len(logp[i])):
            if not mask[i][t]:
                continue
            ratio = math.exp(logp[i][t] - old[i][t])
            clipped = min(max(ratio, 1 - eps_low), 1 + eps_high)
            objective = min(ratio * adv[i], clipped * adv[i])
            kl = math.exp(ref[i][t] - logp[i][t]) - (ref[i][t] - logp[i][t]) - 1
            total += -(objective - beta * kl)
            count += 1
        per_seq_sum.append(total)
        per_seq_count.append(count)
    if mode == "token-mean":
        return sum(per_seq_sum) / sum(per_seq_count)
    if mode == "seq-mean-token-mean":
        return sum(s / max(c, 1) for s, c in zip(per_seq_sum, per_seq_count)) / len(logp)
    return sum(per_seq_sum) / len(logp)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(3)
    n, t = 6, 7
    old = -torch.rand(n, t, generator=g, dtype=torch.float64) * 3
    logp = (old + torch.randn(n, t, generator=g, dtype=torch.float64) * 0.4).requires_grad_(True)  # ratios well outside the clip range too
    ref = old + torch.randn(n, t, generator=g, dtype=torch.float64) * 0.3
    mask = torch.ones(n, t, dtype=torch.bool)
    for i, length in enumerate([7, 3, 5, 1, 6, 4]):
        mask[i, length:] = False
    rewards = torch.tensor([1.0, 0.0, 0.5, 1.0, 1.0, 0.0], dtype=torch.float64)
    return logp, old, ref, mask, rewards


@pytest.mark.parametrize("mode", AGGREGATIONS)
@pytest.mark.parametrize("scale", [True, False])
def test_loss_and_gradient_match_the_formula(batch, mode, scale):
    logp, old, ref, mask, rewards = batch
    adv = group_advantages(rewards, 3, scale=scale).double()
    assert adv.tolist() == pytest.approx(reference_advantages(rewards.tolist(), 3, scale))
    parts = grpo_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28, beta=0.05, ref_logprobs=ref, aggregation=mode)
    parts.loss.backward()
    grad = logp.grad.clone()

    leaf = logp.detach().clone().requires_grad_(True)
    # the reference in autograd-free Python, differentiated by central differences
    def f(values):
        return reference_loss(values.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(), 0.2, 0.28, 0.05, mode)

    assert float(parts.loss.detach()) == pytest.approx(f(leaf.detach()), rel=1e-10, abs=1e-12)
    h = 1e-6
    numeric = torch.zeros_like(grad)
    for i in range(grad.shape[0]):
        for j in range(grad.shape[1]):
            up, down = leaf.detach().clone(), leaf.detach().clone()
            up[i, j] += h
            down[i, j] -= h
            numeric[i, j] = (f(up) - f(down)) / (2 * h)
    torch.testing.assert_close(grad, numeric, atol=1e-6, rtol=1e-5)
    assert not grad[~mask].any()  # padding carries no gradient


def test_clip_fraction_counts_the_tokens_whose_clipped_term_is_taken(batch):
    logp, old, _, mask, rewards = batch
    adv = group_advantages(rewards, 3)
    parts = grpo_loss(logp, old, adv, mask, clip_low=0.2)
    ratio = (logp - old).exp().detach()
    expected = 0
    for i in range(ratio.shape[0]):
        for t in range(ratio.shape[1]):
            if mask[i, t] and ((adv[i] > 0 and ratio[i, t] > 1.2) or (adv[i] < 0 and ratio[i, t] < 0.8)):
                expected += 1
    assert float(parts.clip_fraction) == pytest.approx(expected / int(mask.sum()))
    assert float(parts.kl) == 0.0  # no reference, no KL


def test_equal_rewards_give_zero_advantage_and_no_gradient():
    adv = group_advantages(torch.tensor([0.7, 0.7, 0.7, 0.0, 1.0, 0.0]), 3)
    assert adv[:3].tolist() == [0.0, 0.0, 0.0]
    assert adv[3:].sum().abs() < 1e-6 and adv[4] > 0 > adv[3]
    logp = torch.randn(3, 4, requires_grad=True)
    grpo_loss(logp, logp.detach(), adv[:3], torch.ones(3, 4, dtype=torch.bool)).loss.backward()
    assert not logp.grad.any()


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_micro_batches_with_batch_totals_add_up_to_the_batch(mode):
    per_token = torch.randn(5, 6)
    mask = torch.rand(5, 6) > 0.3
    whole = aggregate(per_token, mask, mode)
    parts = sum(aggregate(per_token[s], mask[s], mode, total_tokens=float(mask.sum()), total_seqs=5.0) for s in (slice(0, 2), slice(2, 5)))
    assert float(parts) == pytest.approx(float(whole), rel=1e-6)


def test_a_group_of_one_is_refused():
    from r1kit.errors import ConfigError

    with pytest.raises(ConfigError, match="at least 2"):
        group_advantages(torch.tensor([1.0, 0.0]), 1)
