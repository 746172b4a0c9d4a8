"""The paged decode-attention kernel: against a naive softmax attention over the slots each row's
block table names (property test over shapes, GQA groups, windows, block sizes, fp32 and bf16); its
use by the engine; a build that cannot happen; and the process's float state left alone."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from r1kit import LLM, SamplingParams
from r1kit.infer import decode_attention
from r1kit.infer.generate import generate
from r1kit.model import R1kitForCausalLM
from r1kit.model.attention import local_attention, window_start
from r1kit.model.rope import apply_rotary

KERNEL = decode_attention.load_kernel()
pytestmark = pytest.mark.skipif(KERNEL is None, reason="no C compiler: the engine gathers K/V instead")


def naive(q, k_pool, v_pool, tables, contexts, lowest, block_size):
    """Row by row, head by head: softmax(q·kᵀ/√D)·v over positions [lowest, context)."""
    seqs, hq, _, dim = q.shape
    group = hq // k_pool.shape[1]
    out = torch.zeros(seqs, hq, 1, dim, dtype=torch.float64)
    for s in range(seqs):
        pos = torch.arange(int(lowest[s]), int(contexts[s]))
        slots = tables[s][pos // block_size] * block_size + pos % block_size
        for head in range(hq):
            keys, values = k_pool[slots, head // group].double(), v_pool[slots, head // group].double()
            weights = torch.softmax(keys @ q[s, head, 0].double() / dim**0.5, dim=0)
            out[s, head, 0] = weights @ values
    return out


@st.composite
def problems(draw):
    seqs, hkv, group = draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.sampled_from([1, 2, 3, 4]))
    dim = draw(st.sampled_from([8, 40, 64, 128]))
    block_size = draw(st.integers(1, 8))
    contexts = [draw(st.integers(1, 40)) for _ in range(seqs)]
    lowest = [draw(st.integers(0, c - 1)) for c in contexts]
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    seed = draw(st.integers(0, 2**16))
    return seqs, hkv, group, dim, block_size, contexts, lowest, dtype, seed


def random_case(seqs, hkv, group, dim, block_size, contexts, lowest, dtype, seed):
    """(q, k_pool, v_pool, tables, contexts, lowest, block_size) with each row's blocks anywhere in
    the pool, in any order (what a block manager hands out)."""
    g = torch.Generator().manual_seed(seed)
    width = max(-(-c // block_size) for c in contexts)
    num_blocks = seqs * width + 3
    k_pool, v_pool = (torch.randn(num_blocks * block_size, hkv, dim, generator=g).to(dtype) for _ in range(2))
    tables = torch.randperm(num_blocks, generator=g)[: seqs * width].view(seqs, width).contiguous()
    q = torch.randn(seqs, hkv * group, 1, dim, generator=g).to(dtype)
    return q, k_pool, v_pool, tables, torch.tensor(contexts), torch.tensor(lowest), block_size


def assert_matches_naive(kernel, case, device="cpu"):
    q = case[0]
    out = kernel(*(t.to(device) if torch.is_tensor(t) else t for t in case))
    assert out.shape == q.shape and out.dtype == q.dtype
    want = naive(*case)
    tolerance = 1e-5 if q.dtype == torch.float32 else 2e-2  # half precision: the output's own rounding
    assert (out.cpu().double() - want).abs().max() <= tolerance * max(1.0, float(want.abs().max()))


@settings(max_examples=60, deadline=None)
@given(problems())
def test_kernel_equals_naive_attention(problem):
    assert_matches_naive(KERNEL, random_case(*problem))


def assert_matches_eager_local(kernel, case, window, device="cpu"):
    """A decode query at position p of a local layer: the kernel reading the pool from the model's
    ``window_start(p, w)`` gives what the eager path's ``local_attention`` gives over the row's keys."""
    q, k_pool, v_pool, tables, contexts, _, block_size = case
    lowest = window_start(contexts - 1, window)
    out = kernel(*(t.to(device) for t in (q, k_pool, v_pool, tables, contexts, lowest)), block_size).cpu()
    for s in range(q.shape[0]):
        pos = torch.arange(int(contexts[s]))
        slots = tables[s][pos // block_size] * block_size + pos % block_size
        keys, values = (pool[slots].transpose(0, 1)[None].double() for pool in (k_pool, v_pool))  # [1, Hkv, n, D]
        want = local_attention(q[s : s + 1].double(), keys, values, window)
        tolerance = 1e-5 if q.dtype == torch.float32 else 2e-2
        assert (out[s : s + 1].double() - want).abs().max() <= tolerance * max(1.0, float(want.abs().max()))


@settings(max_examples=40, deadline=None)
@given(problems(), st.integers(1, 12))
def test_kernel_under_the_window_rule_equals_eager_local_attention(problem, window):
    assert_matches_eager_local(KERNEL, random_case(*problem), window)


@settings(max_examples=40, deadline=None)
@given(problems(), st.integers(0, 1000))
def test_fused_rope_store_attend_equals_the_three_steps(problem, position_seed):
    """rope_attend = apply_rotary on q and k, write k and v into each row's newest slot, naive attention."""
    q, k_pool, v_pool, tables, contexts, lowest, block_size = random_case(*problem)
    seqs, hq, _, dim = q.shape
    hkv, dtype = k_pool.shape[1], q.dtype
    g = torch.Generator().manual_seed(position_seed)
    qkv = torch.randn(seqs, 1, (hq + 2 * hkv) * dim, generator=g).to(dtype)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, dim, 2).float() / dim)
    angles = torch.randint(0, 4096, (seqs, 1, 1), generator=g).float() * inv_freq
    cos, sin = torch.cat((angles.cos(),) * 2, -1).to(dtype), torch.cat((-angles.sin(), angles.sin()), -1).to(dtype)
    newest = contexts - 1
    slots = tables.gather(1, (newest // block_size)[:, None])[:, 0] * block_size + newest % block_size
    want_q, want_k, want_v = qkv.view(seqs, 1, hq + 2 * hkv, dim).transpose(1, 2).split([hq, hkv, hkv], dim=1)
    want_q, want_k = apply_rotary(want_q, cos, sin), apply_rotary(want_k, cos, sin)
    k_ref, v_ref = k_pool.clone(), v_pool.clone()
    k_ref[slots], v_ref[slots] = want_k[:, :, 0], want_v[:, :, 0]

    out = KERNEL.rope_attend(qkv, cos, sin, k_pool, v_pool, slots, tables, contexts, lowest, block_size, hq)
    assert out.shape == (seqs, 1, hq * dim) and out.dtype == dtype
    # the written keys round as PyTorch's `x * cos + roll(x) * sin` does: bit for bit, bf16 and fp32
    assert torch.equal(k_pool, k_ref)
    assert torch.equal(v_pool, v_ref)
    want = naive(want_q, k_ref, v_ref, tables, contexts, lowest, block_size)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert (out.view(seqs, hq, 1, dim).double() - want).abs().max() <= tolerance * max(1.0, float(want.abs().max()))


class Counting:
    """The engine's kernel, counting the rows of each call: ``plain`` (attention alone) and ``fused``
    (rotary, K/V write and attention in one call)."""

    def __init__(self, kernel):
        self.kernel, self.plain, self.fused = kernel, [], []

    def supports(self, dtype, device):
        return self.kernel.supports(dtype, device)

    def __call__(self, q, *args):
        self.plain.append(q.shape[0])
        return self.kernel(q, *args)

    def rope_attend(self, qkv, *args):
        self.fused.append(qkv.shape[0])
        return self.kernel.rope_attend(qkv, *args)


def quantized(model):
    from r1kit.quant import QuantConfig, quantize_model, to_quantized

    qc = QuantConfig(group_size=32, method="rtn")
    return to_quantized(model, quantize_model(model, qc), qc)


@pytest.mark.parametrize("weights", ["float32", "bfloat16", "int4"])
def test_engine_decodes_global_and_local_layers_in_one_fused_call(tiny_config, weights):
    model = R1kitForCausalLM(tiny_config(attention=("global", "local"), local_window=5, qkv_bias=True, hidden_size=64,
                                         num_heads=4, num_kv_heads=2, intermediate_size=128)).eval()
    model = quantized(model) if weights == "int4" else model.to(getattr(torch, weights))
    prompts = [[5, 9, 2, 7, 1, 3, 8, 4, 6, 10, 11], [3, 1, 4]]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    llm = LLM(model, block_size=4, num_kv_blocks=32, decode_step=False)  # the module path: the one-call step has its own attention
    want = [generate(model, p, params) for p in prompts]  # the caller's model: the engine fused only its own copy
    assert not hasattr(model.model.layers[0].self_attn, "qkv_proj")
    pool = llm.llm_engine.runner.pool
    if weights == "int4":  # q/k/v through one int4 kernel call, as a GPTQ checkpoint runs in the engine
        from r1kit.quant.int4_linear import FusedInt4Linear

        assert isinstance(llm.llm_engine.model.model.layers[0].self_attn.qkv_proj, FusedInt4Linear)
    pool.decode_kernel = counting = Counting(pool.decode_kernel)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == want
    assert len(counting.fused) >= 2 * 9 and max(counting.fused) == 2  # both layers, every decode step, both rows at once
    assert not counting.plain  # nothing took the two-call path


def test_fused_call_zero_fills_a_row_with_no_keys_and_checks_its_inputs():
    q, k_pool, v_pool, tables, contexts, lowest, block_size = random_case(2, 2, 2, 64, 4, [9, 5], [0, 0], torch.float32, 0)
    qkv = torch.randn(2, 1, (4 + 2 * 2) * 64)
    cos, sin = torch.ones(2, 1, 64), torch.zeros(2, 1, 64)  # position 0: no rotation
    slots = torch.tensor([0, 1])
    out = KERNEL.rope_attend(qkv, cos, sin, k_pool, v_pool, slots, tables, contexts, torch.tensor([0, 5]), block_size, 4)
    assert out[1].abs().max() == 0 and out[0].abs().max() > 0  # row 1 sees no position: zeros, as the plain kernel gives
    assert torch.equal(k_pool[1], qkv[1, 0, 4 * 64 : 6 * 64].view(2, 64))  # its K/V are written all the same
    with pytest.raises(ValueError, match="one row of 64 per sequence"):  # a broadcast cos would be read out of bounds
        KERNEL.rope_attend(qkv, cos[:1], sin[:1], k_pool, v_pool, slots, tables, contexts, lowest, block_size, 4)
    with pytest.raises(ValueError, match="not one token of 3"):
        KERNEL.rope_attend(qkv, cos, sin, k_pool, v_pool, slots, tables, contexts, lowest, block_size, 3)


def test_engine_decodes_through_the_kernel(tiny_config):
    model = R1kitForCausalLM(tiny_config(attention=("local", "hybrid"), local_window=5)).eval()
    prompts = [[5, 9, 2, 7, 1, 3, 8, 4, 6, 10, 11], [3, 1, 4]]
    params = SamplingParams(temperature=0, max_tokens=10)
    want = [generate(model, p, params) for p in prompts]
    llm = LLM(model, block_size=4, num_kv_blocks=32)
    pool = llm.llm_engine.runner.pool
    pool.decode_kernel = counting = Counting(pool.decode_kernel)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == want
    # the local layer: one fused call a decode step; the hybrid one mixes two branches of one q, so it
    # keeps the plain kernel, once per branch
    assert len(counting.fused) >= 9 and max(counting.fused) == 2
    assert len(counting.plain) >= 2 * len(counting.fused) and max(counting.plain) == 2


def test_loading_the_kernel_keeps_subnormal_floats():
    # linking with -ffast-math would add crtfastmath.o, which flushes subnormals process-wide at load
    assert float(np.float32(1e-40)) != 0.0 and float(torch.tensor(1e-40) * 1) != 0.0


def test_no_compiler_is_a_clear_failure_and_the_engine_gathers(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with pytest.raises(OSError):
        decode_attention.build(tmp_path / "cache")
    model = R1kitForCausalLM(tiny_config()).eval()
    llm = LLM(model, block_size=4, num_kv_blocks=16, decode_kernel=False)
    assert llm.llm_engine.runner.pool.decode_kernel is None
    params = SamplingParams(temperature=0, max_tokens=5)
    assert llm.generate([[1, 2, 3]], params)[0].outputs[0].token_ids == generate(model, [1, 2, 3], params)


def test_bad_inputs_are_clear_errors():
    pool = torch.zeros(8, 2, 16)
    tables, contexts, lowest = torch.zeros(1, 2, dtype=torch.long), torch.tensor([3]), torch.tensor([0])
    with pytest.raises(RuntimeError, match="bad head grouping"):  # 3 query heads cannot share 2 KV heads
        KERNEL(torch.zeros(1, 3, 1, 16), pool, pool, tables, contexts, lowest, 4)
    with pytest.raises(TypeError, match="int64"):
        KERNEL(torch.zeros(1, 4, 1, 16), pool, pool, tables.int(), contexts, lowest, 4)
    with pytest.raises(ValueError, match="k_pool must be contiguous"):
        KERNEL(torch.zeros(1, 4, 1, 16), pool.transpose(0, 1), pool, tables, contexts, lowest, 4)
