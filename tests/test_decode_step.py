"""The one-call decode step (r1kit.infer.decode_step) against the model's eager forward.

A sequence decoding alone on the CPU runs the whole model in one C call. Its logits are compared
with the eager model run over the whole sequence without any cache (an independent reference: no
paged pool, no packed layer, no kernel of the engine's), and the engine's greedy tokens with the
reference decoding loop, for global, local and mixed layers (the window group's own block table),
q/k/v biases, grouped heads, float32 and bfloat16, packed and plain weights. GPTQ 4- and 8-bit models
(act-order or not, a quantized head or not) are compared with the same model whose layers dequantize
their codes to float (PyTorch's matmul: no kernel of r1kit's), to within the activations' rounding."""

import copy

import pytest
import torch

from r1kit import LLM, SamplingParams
from r1kit.infer.decode_step import DecodeStep, load_library
from r1kit.infer.generate import generate
from r1kit.model import R1kitForCausalLM
from r1kit.quant import QuantConfig, QuantLinear, quantize_model, to_quantized
from r1kit.quant.cpu_int4 import load as load_int4

pytestmark = pytest.mark.skipif(load_library() is None, reason="no C compiler: the engine decodes module by module")


def model_of(tiny_config, dtype=torch.float32, **overrides):
    config = tiny_config(**{**dict(hidden_size=64, num_heads=4, num_kv_heads=2, intermediate_size=96, qkv_bias=True, tie_embeddings=False),
                            **overrides})
    return R1kitForCausalLM(config).eval().to(dtype)


def prompts_of(lengths, vocab=61, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def batch_logits(llm, prompts, new_tokens):
    """Per call of the engine's step while it generates ``prompts`` together: (each sequence's tokens
    seen, the logits [B, V] returned)."""
    runner = llm.llm_engine.runner
    assert runner.step is not None
    real, steps = runner.step, []

    def spy(seqs, window_tables=None):
        logits = real(seqs, window_tables)
        steps.append(([list(seq.token_ids[: seq.num_computed_tokens + 1]) for seq in seqs], logits.clone()))
        return logits

    runner.step = spy
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=new_tokens))
    return steps


def step_logits(llm, prompt, new_tokens):
    """(tokens seen, logits [1, V] returned) of every call of the engine's step while it generates ``prompt``."""
    steps = [(tokens, logits) for [tokens], logits in batch_logits(llm, [prompt], new_tokens)]
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


def batch_against_alone(llm, prompts, new_tokens):
    """Runs ``prompts`` together and, at every step of the batch, each sequence's step alone on the same
    pool (rewriting the same K/V); returns the largest batch seen and whether every row was equal."""
    runner = llm.llm_engine.runner
    real, seen = runner.step, {"largest": 0, "equal": True}

    def spy(seqs, window_tables=None):
        logits = real(seqs, window_tables)
        for i, seq in enumerate(seqs):
            row = real([seq], None if window_tables is None else [window_tables[i]])[0]
            seen["equal"] &= torch.equal(row, logits[i])
        seen["largest"] = max(seen["largest"], len(seqs))
        return logits

    runner.step = spy
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=new_tokens))
    return seen["largest"], seen["equal"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_step_equals_each_sequence_alone(tiny_config, dtype):
    """A step of several sequences (different lengths, local and global layers, so each has its own
    tables in both groups) returns, row for row, what each sequence's step alone returns, to the bit:
    every sum runs in one order whatever the batch."""
    model = model_of(tiny_config, dtype=dtype, attention=("local", "global"))
    prompts = prompts_of([3, 9, 14, 6, 11])
    assert batch_against_alone(LLM(model, block_size=4, num_kv_blocks=96), prompts, 7) == (len(prompts), True)


def test_batched_step_logits_equal_the_eager_forward(tiny_config):
    model = model_of(tiny_config, attention=("local", "global"))
    llm = LLM(model, block_size=4, num_kv_blocks=96)
    steps = batch_logits(llm, prompts_of([2, 10, 5, 13, 7, 4]), 6)
    assert max(logits.shape[0] for _, logits in steps) == 6
    with torch.inference_mode():
        for seqs, logits in steps:
            for tokens, row in zip(seqs, logits):
                torch.testing.assert_close(row, model(torch.tensor([tokens]))[0, -1], rtol=1e-4, atol=1e-4)


def test_engine_greedy_equals_reference_in_a_batch(tiny_config):
    model = model_of(tiny_config, attention=("local", "global"))
    params = SamplingParams(temperature=0, max_tokens=12)
    prompts = prompts_of([3, 11, 17, 6])
    outputs = LLM(model, block_size=4, num_kv_blocks=96).generate(prompts, params)
    assert [out.outputs[0].token_ids for out in outputs] == [generate(model, p, params) for p in prompts]


def test_bfloat16_step_is_close_to_the_eager_forward(tiny_config):
    model = model_of(tiny_config, dtype=torch.bfloat16)
    llm = LLM(model, block_size=4, num_kv_blocks=32)
    [prompt] = prompts_of([6])
    with torch.inference_mode():
        for tokens, logits in step_logits(llm, prompt, 5):
            want = model(torch.tensor([tokens]))[0, -1]
            assert logits.dtype == torch.float32 and torch.equal(logits, logits.bfloat16().float())  # bfloat16 values, as float32
            torch.testing.assert_close(logits[0].float(), want.float(), rtol=0.03, atol=0.05)


def test_no_step_where_the_model_has_layers_it_does_not_cover(tiny_config):
    for overrides in (dict(attention="hybrid"), dict(ffn="topk")):
        model = model_of(tiny_config, **overrides)
        runner = LLM(model, block_size=4, num_kv_blocks=16).llm_engine.runner
        assert runner.step is None and DecodeStep.build(runner.model, runner.pool) is None
    assert LLM(model_of(tiny_config), block_size=4, num_kv_blocks=16, decode_kernel=False).llm_engine.runner.step is None
    plain = LLM(model_of(tiny_config), block_size=4, num_kv_blocks=16, decode_step=False).llm_engine
    assert plain.runner.step is None and plain.runner.pool.decode_kernel is not None  # the attention kernel stays


def test_update_weights_rebuilds_the_step(tiny_config):
    model, other = model_of(tiny_config), model_of(tiny_config)
    llm = LLM(model, block_size=4, num_kv_blocks=32)
    params = SamplingParams(temperature=0, max_tokens=8)
    [prompt] = prompts_of([5])
    llm.llm_engine.update_weights(other)
    assert llm.generate([prompt], params)[0].outputs[0].token_ids == generate(other, prompt, params)


def quantized_model_of(tiny_config, bits, desc_act=False, lm_head=False, dtype=torch.float32):
    """A tiny model with GPTQ codes of ``bits`` (widths the kernels' 32-column tiles take) and random
    calibration, so act-order has an order to apply."""
    model = model_of(tiny_config, intermediate_size=128, vocab_size=64, attention=("local", "global"))
    config = QuantConfig(bits=bits, group_size=32, desc_act=desc_act, lm_head=lm_head)
    calib = torch.randint(0, 64, (4, 24), generator=torch.Generator().manual_seed(3))
    return to_quantized(model, quantize_model(model, config, calib, batch_size=4), config).to(dtype)


def dequantized_copy(model):
    """``model`` with every GPTQ layer on the dequantize reference: float weights through PyTorch."""
    ref = copy.deepcopy(model)
    for module in ref.modules():
        if isinstance(module, QuantLinear):
            module.backend = "dequant"
    return ref


@pytest.mark.parametrize("bits,desc_act,lm_head", [(4, False, False), (4, True, True), (8, False, True), (8, True, False)])
def test_quantized_step_logits_match_the_dequantized_model(tiny_config, bits, desc_act, lm_head):
    if bits == 4 and load_int4() is None:
        pytest.skip("no AVX512-BF16 here: int4 layers run torch's kernel, which the step does not call")
    model = quantized_model_of(tiny_config, bits, desc_act, lm_head)
    reference = dequantized_copy(model)
    llm = LLM(model, block_size=4, num_kv_blocks=32)
    runner = llm.llm_engine.runner
    assert runner.step is not None, "the step must take GPTQ layers on r1kit's CPU kernels"
    [prompt] = prompts_of([9])
    with torch.inference_mode():
        for tokens, logits in step_logits(llm, prompt, 8):
            want = reference(torch.tensor([tokens]))[0, -1]
            # the kernels round activations (int4: to bfloat16; int8: to int8 blocks of 32)
            tolerance = (0.02 if bits == 4 else 0.05) * float(want.abs().max())
            torch.testing.assert_close(logits[0], want, rtol=0, atol=tolerance)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_step_greedy_equals_the_module_path(tiny_config, bits):
    """The step calls the very tiles the layers' kernels run, so it decodes exactly what the engine
    decodes module by module (the paged attention kernel kept, only the step swapped out), one
    sequence at a time and in a batch."""
    if bits == 4 and load_int4() is None:
        pytest.skip("no AVX512-BF16 here: int4 layers run torch's kernel, which the step does not call")
    params = SamplingParams(temperature=0, max_tokens=12)
    prompts = prompts_of([3, 11, 17, 8, 5, 14])
    model, outputs = quantized_model_of(tiny_config, bits, lm_head=True), []
    for use_step in (True, False):
        llm = LLM(copy.deepcopy(model), block_size=4, num_kv_blocks=128)
        if not use_step:
            llm.llm_engine.runner.step = None
        assert (llm.llm_engine.runner.step is not None) == use_step
        alone = [llm.generate([p], params)[0].outputs[0].token_ids for p in prompts]
        outputs.append((alone, [out.outputs[0].token_ids for out in llm.generate(prompts, params)]))
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("bits", [4, 8])
def test_batched_quantized_step_equals_each_sequence_alone(tiny_config, bits):
    if bits == 4 and load_int4() is None:
        pytest.skip("no AVX512-BF16 here: int4 layers run torch's kernel, which the step does not call")
    model = quantized_model_of(tiny_config, bits, desc_act=True, lm_head=True)
    prompts = prompts_of([3, 9, 14, 6, 11], vocab=64)
    assert batch_against_alone(LLM(model, block_size=4, num_kv_blocks=96), prompts, 6) == (len(prompts), True)


def test_bfloat16_quantized_step_is_close_to_the_dequantized_model(tiny_config):
    model = quantized_model_of(tiny_config, 8, dtype=torch.bfloat16)
    reference = dequantized_copy(model)
    llm = LLM(model, block_size=4, num_kv_blocks=32)
    assert llm.llm_engine.runner.step is not None
    [prompt] = prompts_of([6])
    with torch.inference_mode():
        for tokens, logits in step_logits(llm, prompt, 5):
            want = reference(torch.tensor([tokens]))[0, -1].float()
            assert logits.dtype == torch.float32 and torch.equal(logits, logits.bfloat16().float())  # bfloat16 values, as float32
            torch.testing.assert_close(logits[0].float(), want, rtol=0, atol=0.08 * float(want.abs().max()))
