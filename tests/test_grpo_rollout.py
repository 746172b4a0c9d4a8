"""Rollouts come from the policy's current weights: after ``update_weights`` the same engine object
samples from the new weights (its logprobs equal a fresh model's forward), its prefix cache serves
no K/V of the old ones, and the caller's model stays trainable and unshared."""

import pytest
import torch

from r1kit.infer.sampling import SamplingParams
from r1kit.model import R1kitForCausalLM
from r1kit.reason.rollout import RolloutEngine


def reference_logprobs(model, prompt: list[int], completion: list[int]) -> list[float]:
    tokens = torch.tensor([prompt + completion])
    with torch.no_grad():
        logp = model(tokens)[0, :-1].float().log_softmax(-1)
    return [float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(completion)]


@pytest.mark.parametrize("pack_weights", [True, False])
def test_rollouts_after_a_weight_update_come_from_the_new_weights(tiny_config, pack_weights):
    config = tiny_config(max_seq_len=128, tie_embeddings=True)
    policy = R1kitForCausalLM(config)
    rollouts = RolloutEngine(policy, None, max_model_len=96, max_num_seqs=4, pack_weights=pack_weights, block_size=8)
    engine = rollouts.engine
    prompt = torch.randint(0, 61, (40,)).tolist()  # five full blocks: a prefix-cache hit if it were kept
    params = SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True)
    before = rollouts.generate([prompt], 2, params, seed=1)
    for r in before:
        assert r.logprobs == pytest.approx(reference_logprobs(policy, prompt, r.completion_ids), abs=1e-4)

    with torch.no_grad():  # an optimizer step's worth of change, in place, as AdamW makes it
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    stale = rollouts.generate([prompt], 2, params, seed=1)
    assert [r.completion_ids for r in stale] == [r.completion_ids for r in before]  # not yet synced: the engine's own copy

    rollouts.sync(policy)
    assert rollouts.engine is engine
    after = rollouts.generate([prompt], 2, params, seed=1)
    fresh = R1kitForCausalLM(config)
    fresh.load_state_dict(policy.state_dict())
    for r in after:
        assert r.logprobs == pytest.approx(reference_logprobs(fresh, prompt, r.completion_ids), abs=1e-4)
    assert [r.completion_ids for r in after] != [r.completion_ids for r in before]

    # the policy is not shared with the engine: changing it again leaves the engine as synced
    with torch.no_grad():
        for p in policy.parameters():
            p.zero_()
    again = rollouts.generate([prompt], 2, params, seed=1)
    assert [r.completion_ids for r in again] == [r.completion_ids for r in after]
    assert all(p.requires_grad for p in policy.parameters())


def test_update_weights_takes_a_state_dict_and_refuses_mid_request(tiny_config):
    config = tiny_config(max_seq_len=64)
    policy = R1kitForCausalLM(config)
    rollouts = RolloutEngine(policy, None, max_model_len=64, max_num_seqs=2)
    other = R1kitForCausalLM(config)
    rollouts.engine.update_weights(other.state_dict())
    out = rollouts.generate([[1, 2, 3]], 2, SamplingParams(max_tokens=4, ignore_eos=True), seed=0)
    assert out[0].logprobs == pytest.approx(reference_logprobs(other, [1, 2, 3], out[0].completion_ids), abs=1e-4)
    rollouts.engine.add_request("busy", [1, 2, 3], SamplingParams(max_tokens=4))
    with pytest.raises(RuntimeError, match="unfinished"):
        rollouts.engine.update_weights(policy)
