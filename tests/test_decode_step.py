"""The one-call decode step (r1kit.infer.decode_step) against the model's eager forward.

A sequence decoding alone on the CPU runs the whole model in one C call. Its logits are compared
with the eager model run over the whole sequence without any cache (an independent reference: no
paged pool, no packed layer, no kernel of the engine's), and the engine's greedy tokens with the
reference decoding loop, for global, local and mixed layers (the window group's own block table),
q/k/v biases, grouped heads, float32 and bfloat16, packed and plain weights."""

import pytest
import torch

from r1kit import LLM, SamplingParams
from r1kit.infer.decode_step import DecodeStep, load_library
from r1kit.infer.generate import generate
from r1kit.model import R1kitForCausalLM

pytestmark = pytest.mark.skipif(load_library() is None, reason="no C compiler: the engine decodes module by module")


def model_of(tiny_config, dtype=torch.float32, **overrides):
    config = tiny_config(hidden_size=64, num_heads=4, num_kv_heads=2, intermediate_size=96, qkv_bias=True, tie_embeddings=False,
                         **overrides)
    return R1kitForCausalLM(config).eval().to(dtype)


def prompts_of(lengths, vocab=61, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def step_logits(llm, prompt, new_tokens):
    """(tokens seen, logits returned) of every call of the engine's step while it generates ``prompt``."""
    runner = llm.llm_engine.runner
    assert runner.step is not None
    real, steps = runner.step, []

    def spy(seq, window_table=None):
        logits = real(seq, window_table)
        steps.append((list(seq.token_ids[: seq.num_computed_tokens + 1]), logits.clone()))
        return logits

    runner.step = spy
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=new_tokens))
    assert len(steps) == new_tokens - 1  # the first token comes from the prefill
    return steps


@pytest.mark.parametrize("attention", ["global", ("local", "global")])
@pytest.mark.parametrize("pack_weights", [True, False])
def test_step_logits_equal_the_eager_forward(tiny_config, attention, pack_weights):
    model = model_of(tiny_config, attention=attention)
    llm = LLM(model, block_size=4, num_kv_blocks=32, pack_weights=pack_weights)
    [prompt] = prompts_of([9])
    with torch.inference_mode():
        for tokens, logits in step_logits(llm, prompt, 8):  # 9 + 7 > 12: positions past local_window 4
            torch.testing.assert_close(logits[0], model(torch.tensor([tokens]))[0, -1], rtol=1e-4, atol=1e-4)


def test_engine_greedy_equals_reference_one_request_at_a_time(tiny_config):
    model = model_of(tiny_config, attention=("local", "global"))
    params = SamplingParams(temperature=0, max_tokens=12)
    llm = LLM(model, block_size=4, num_kv_blocks=64)
    for prompt in prompts_of([3, 11, 17]):
        [out] = llm.generate([prompt], params)
        assert out.outputs[0].token_ids == generate(model, prompt, params)


def test_bfloat16_step_is_close_to_the_eager_forward(tiny_config):
    model = model_of(tiny_config, dtype=torch.bfloat16)
    llm = LLM(model, block_size=4, num_kv_blocks=32)
    [prompt] = prompts_of([6])
    with torch.inference_mode():
        for tokens, logits in step_logits(llm, prompt, 5):
            want = model(torch.tensor([tokens]))[0, -1]
            assert logits.dtype == torch.bfloat16
            torch.testing.assert_close(logits[0].float(), want.float(), rtol=0.03, atol=0.05)


def test_no_step_where_the_model_has_layers_it_does_not_cover(tiny_config):
    for overrides in (dict(attention="hybrid"), dict(ffn="topk")):
        model = model_of(tiny_config, **overrides)
        runner = LLM(model, block_size=4, num_kv_blocks=16).llm_engine.runner
        assert runner.step is None and DecodeStep.build(runner.model, runner.pool) is None
    assert LLM(model_of(tiny_config), block_size=4, num_kv_blocks=16, decode_kernel=False).llm_engine.runner.step is None


def test_update_weights_rebuilds_the_step(tiny_config):
    model, other = model_of(tiny_config), model_of(tiny_config)
    llm = LLM(model, block_size=4, num_kv_blocks=32)
    params = SamplingParams(temperature=0, max_tokens=8)
    [prompt] = prompts_of([5])
    llm.llm_engine.update_weights(other)
    assert llm.generate([prompt], params)[0].outputs[0].token_ids == generate(other, prompt, params)
