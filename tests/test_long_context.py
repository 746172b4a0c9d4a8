"""Long-context serving: every attention kind at its own cost in the engine, against the model's own
reference forward (greedy tokens equal, logprobs close) with chunked prefill, prefix-cache hits and
preemption; the compressed cache; the hard gate's skip (the global work really not done); windowed
layers holding only their window; the C kernel's hybrid call against a naive attention written here;
``r1kit bench --context``. (The Triton kernel: ``test_long_context_triton.py``.)"""

import argparse

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_decode_attention import naive, random_case

from r1kit import LLM, SamplingParams
from r1kit.infer import decode_attention
from r1kit.infer.benchmark import kv_bytes_held
from r1kit.infer.engine import EngineConfig, LLMEngine
from r1kit.infer.generate import generate
from r1kit.infer.paged_cache import PagedBatch, PagedRange, bytes_per_block
from r1kit.model import R1kitForCausalLM

KERNEL = decode_attention.load_kernel()
PATTERNS = {
    "global": dict(attention="global"),
    "local": dict(attention="local"),
    "hybrid-full": dict(attention="hybrid"),
    "hybrid-compressed": dict(attention="hybrid", hybrid_global="compressed"),
    "guide-full": dict(attention=["local", "local", "local", "hybrid"], num_layers=4),
    "guide-compressed": dict(attention=["local", "local", "local", "hybrid"], num_layers=4, hybrid_global="compressed"),
    "mixed": dict(attention=["global", "local", "hybrid", "local"], num_layers=4, hybrid_global="compressed", hybrid_gate="head"),
}


def prompts_of(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 61, (n,), generator=g).tolist() for n in lengths]


def model_of(tiny_config, **fields):
    base = dict(local_window=5, hybrid_compress_block=4, hidden_size=64, intermediate_size=64)
    return R1kitForCausalLM(tiny_config(**{**base, **fields})).eval()


def assert_logprobs_match_the_full_forward(model, prompt, out):
    """Each generated token's logprob against log_softmax of one cache-less forward over the whole text."""
    tokens = out.token_ids
    with torch.no_grad():
        want = model(torch.tensor([prompt + tokens]))[0].log_softmax(-1)
    for i, (token, entry) in enumerate(zip(tokens, out.logprobs)):
        assert abs(entry[token].logprob - float(want[len(prompt) - 1 + i, token])) < 1e-4


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_engine_equals_the_reference_forward(tiny_config, pattern):
    model = model_of(tiny_config, **PATTERNS[pattern])
    prompts = prompts_of([3, 22, 9, 31])
    prompts.append(prompts[3][:21] + [1, 2])  # shares 5 full blocks with the 31-token prompt
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=1)
    want = [generate(model, p, params) for p in prompts]
    # 12 blocks of 4 tokens cannot hold five requests of up to 41 tokens: decodes preempt; chunks of 7
    llm = LLM(model, block_size=4, num_kv_blocks=12, max_num_batched_tokens=7)
    first = llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in first] == want
    assert llm.llm_engine.scheduler.num_preemptions > 0 or pattern == "local"
    for prompt, out in zip(prompts, first):
        assert_logprobs_match_the_full_forward(model, prompt, out.outputs[0])
    second = llm.generate(prompts, params)  # the same prompts again: prefixes from the cache
    assert [o.outputs[0].token_ids for o in second] == want
    assert sum(o.num_cached_tokens for o in second) > 0 or pattern == "local"
    engine = llm.llm_engine
    engine.block_manager.check_invariants()
    assert engine.block_manager.num_free_blocks == engine.num_blocks and engine.block_manager.window_reserved == 0


class Counting:
    """The engine's C kernel, recording each hybrid call's skip flags (the real kernel runs)."""

    def __init__(self, kernel):
        self.kernel, self.skips = kernel, []

    def supports(self, dtype, device):
        return self.kernel.supports(dtype, device)

    def __call__(self, *args):
        return self.kernel(*args)

    def rope_attend(self, *args):
        return self.kernel.rope_attend(*args)

    def hybrid(self, q, local, glob, gate, skip):
        self.skips.extend(skip.tolist())
        return self.kernel.hybrid(q, local, glob, gate, skip)


@pytest.mark.parametrize("branch", ["full", "compressed"])
def test_the_hard_gate_skips_the_global_work_and_keeps_the_results(tiny_config, branch, monkeypatch):
    model = model_of(tiny_config, attention=["local", "hybrid"], hybrid_global=branch, hybrid_gate_threshold=0.5)
    prompts = prompts_of([30, 12])
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    rows = []
    real = PagedBatch._global_rows
    monkeypatch.setattr(PagedBatch, "_global_rows", lambda self, layer, branch, b, r, *a: rows.append(len(r)) or real(self, layer, branch, b, r, *a))
    for bias, expect in ((50.0, "none"), (0.0, "some")):  # every gate ~1 (all local), then gates around the threshold
        with torch.no_grad():
            model.model.layers[1].self_attn.gate[2].bias.fill_(bias)
        want = [generate(model, p, params) for p in prompts]
        llm = LLM(model, block_size=4, num_kv_blocks=32, max_num_batched_tokens=16)
        pool = llm.llm_engine.runner.pool
        pool.decode_kernel = counting = Counting(pool.decode_kernel)
        rows.clear()
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == want
        prefill_tokens = sum(len(p) for p in prompts)
        assert len(counting.skips) == 2 * (params.max_tokens - 1)  # every decode step of both rows went through the hybrid call
        if expect == "none":  # no token, prefill or decode, computed a global branch
            assert rows == [] and all(counting.skips)
        else:  # some did, fewer than all
            assert 0 < sum(rows) < prefill_tokens and 0 < sum(counting.skips) < len(counting.skips)


@pytest.mark.parametrize("branch", ["full", "compressed"])
def test_without_a_decode_kernel_the_gathered_path_skips_per_token(tiny_config, branch):
    model = model_of(tiny_config, attention=["local", "hybrid"], hybrid_global=branch, hybrid_gate_threshold=0.5)
    with torch.no_grad():
        model.model.layers[1].self_attn.gate[2].bias.fill_(0.0)  # gates around the threshold
    prompts = prompts_of([21, 6, 14])
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    llm = LLM(model, block_size=4, num_kv_blocks=32, max_num_batched_tokens=9, decode_kernel=False)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == [generate(model, p, params) for p in prompts]


def naive_hybrid(q, local, glob, gate, skip):
    """Per row and head: gate·softmax-attention over the local range + (1 − gate)·over the global one;
    the local range alone where skip; zeros for a range with no position."""

    def branch(r):
        if int((r.contexts - r.lowest).min()) > 0:
            return naive(q, r.k, r.v, r.tables, r.contexts, r.lowest, r.block_size)
        out = torch.zeros(q.shape, dtype=torch.float64)
        for s in range(q.shape[0]):
            if r.contexts[s] > r.lowest[s]:
                out[s : s + 1] = naive(q[s : s + 1], r.k, r.v, r.tables[s : s + 1], r.contexts[s : s + 1], r.lowest[s : s + 1], r.block_size)
        return out

    lo, gl = branch(local), branch(glob)
    w = gate.double()[:, :, None, None]
    mixed = w * lo + (1 - w) * gl
    return torch.where(skip.bool()[:, None, None, None], lo, mixed)


def pooled_range(case, compress, entries, seed):
    """The compressed cache of ``case``'s rows: the mean of each complete run of ``compress`` positions,
    written at entry slots of a table of its own (``entries`` a block), and the entries each row sees."""
    q, k_pool, v_pool, tables, contexts, lowest, block_size = case
    g = torch.Generator().manual_seed(seed)
    counts = (contexts // compress).tolist()
    width = max(1, max(-(-c // entries) for c in counts))
    blocks = len(counts) * width + 2
    ck, cv = (torch.full((blocks * entries, *k_pool.shape[1:]), float("nan"), dtype=k_pool.dtype) for _ in range(2))
    ctables = torch.randperm(blocks, generator=g)[: len(counts) * width].view(len(counts), width)
    for s, count in enumerate(counts):
        for j in range(count):
            pos = torch.arange(j * compress, (j + 1) * compress)
            slots = tables[s][pos // block_size] * block_size + pos % block_size
            slot = ctables[s, j // entries] * entries + j % entries
            ck[slot], cv[slot] = k_pool[slots].float().mean(0).to(ck.dtype), v_pool[slots].float().mean(0).to(cv.dtype)
    return PagedRange(ck, cv, ctables, contexts // compress, torch.zeros_like(contexts), entries)


@st.composite
def hybrid_problems(draw):
    seqs, hkv, group = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.sampled_from([1, 2, 4]))
    dim, block_size = draw(st.sampled_from([8, 64])), draw(st.sampled_from([2, 4]))
    contexts = [draw(st.integers(1, 40)) for _ in range(seqs)]
    window = draw(st.integers(1, 12))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    branch = draw(st.sampled_from(["full", "compressed"]))
    compress, entries = draw(st.sampled_from([(4, 1), (2, 2), (8, 1)]))
    return seqs, hkv, group, dim, block_size, contexts, window, dtype, branch, compress, entries, draw(st.integers(0, 2**16))


def hybrid_case(problem):
    seqs, hkv, group, dim, block_size, contexts, window, dtype, branch, compress, entries, seed = problem
    case = random_case(seqs, hkv, group, dim, block_size, contexts, [0] * seqs, dtype, seed)
    q, k_pool, v_pool, tables, ctx, zeros, _ = case
    local = PagedRange(k_pool, v_pool, tables, ctx, (ctx - window).clamp_min(0), block_size)
    glob = pooled_range(case, compress, entries, seed) if branch == "compressed" else PagedRange(k_pool, v_pool, tables, ctx, zeros, block_size)
    g = torch.Generator().manual_seed(seed + 1)
    gate = torch.rand(seqs, hkv * group, generator=g)
    skip = torch.randint(0, 2, (seqs,), generator=g)
    # what a skipped row's global branch alone would read is poisoned: reading it would show as NaN
    for s in range(seqs):
        if not skip[s]:
            continue
        if branch == "full":  # the positions before its window
            poisoned = torch.arange(int(local.lowest[s]))
            k_pool[tables[s][poisoned // block_size] * block_size + poisoned % block_size] = float("nan")
        else:  # its pooled entries
            j = torch.arange(int(glob.contexts[s]))
            glob.k[glob.tables[s][j // entries] * entries + j % entries] = float("nan")
    return q, local, glob, gate, skip


def assert_hybrid_matches_naive(kernel, problem, device="cpu"):
    q, local, glob, gate, skip = hybrid_case(problem)
    moved = (lambda r: PagedRange(*(t.to(device) for t in r[:5]), r.block_size)) if device != "cpu" else (lambda r: r)
    out = kernel.hybrid(q.to(device), moved(local), moved(glob), gate.to(device), skip.to(device)).cpu()
    want = naive_hybrid(q, local, glob, gate, skip)
    assert out.shape == q.shape and out.dtype == q.dtype and not out.isnan().any()
    tolerance = 1e-5 if q.dtype == torch.float32 else 2e-2
    assert (out.double() - want).abs().max() <= tolerance * max(1.0, float(want.abs().max()))


@pytest.mark.skipif(KERNEL is None, reason="no C compiler: the engine gathers K/V instead")
@settings(max_examples=40, deadline=None)
@given(hybrid_problems())
def test_c_kernel_hybrid_call_equals_naive_attention(problem):
    assert_hybrid_matches_naive(KERNEL, problem)


@pytest.mark.skipif(KERNEL is None, reason="no C compiler: the engine gathers K/V instead")
def test_c_kernel_reads_the_compressed_cache_as_the_naive_pooling(tiny_config):
    case = random_case(3, 2, 2, 64, 4, [37, 3, 16], [0, 0, 0], torch.float32, 7)
    pooled = pooled_range(case, 8, 1, 7)
    out = KERNEL(case[0], *pooled)
    assert out[1].abs().max() == 0  # a row before its first complete run sees nothing: zeros, as the model's branch gives
    rows = [0, 2]
    want = naive(case[0][rows], pooled.k, pooled.v, pooled.tables[rows], pooled.contexts[rows], pooled.lowest[rows], 1)
    assert (out[rows].double() - want).abs().max() < 1e-5


def test_windowed_layers_hold_only_their_window_and_the_compressed_cache_is_small(tiny_config):
    """The guide's pattern: the local layers' blocks are freed as they leave the window; the KV a
    request holds while decoding is a fraction of a global model's."""
    held, window_blocks = {}, {}
    for name in ("global", "guide-full", "guide-compressed"):
        model = model_of(tiny_config, **{**PATTERNS[name], "num_layers": 4}, local_window=8, hybrid_compress_block=8)
        engine = LLMEngine(model, config=EngineConfig(block_size=4, num_kv_blocks=64, max_num_batched_tokens=32))
        engine.add_request("0", prompts_of([200])[0], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
        most, most_window, decoding = 0, 0, False
        while engine.has_unfinished_requests():
            outs = engine.step()
            if decoding and engine.scheduler.running:  # after a decode step
                seq = engine.scheduler.running[0]
                most = max(most, kv_bytes_held(engine, seq))
                if engine.window_blocks:
                    most_window = max(most_window, sum(b >= 0 for b in engine.block_manager.window_table(seq)))
            decoding = decoding or bool(outs)
        held[name], window_blocks[name] = most, most_window
        if name != "global":  # window 8 (and runs of 8) + the next token: at most 3 blocks of 4, of 53
            assert 0 < most_window <= 3
            assert engine.block_manager.window_blocks.hash_to_block  # the window's blocks were cached too
        engine.block_manager.reset_prefix_cache()  # new weights: neither group serves a prefix any more
        engine.block_manager.check_invariants()
        assert not engine.block_manager.hash_to_block and not (engine.window_blocks and engine.block_manager.window_blocks.hash_to_block)
    per_token_layer = 2 * 2 * 16 * 4  # K and V, 2 KV heads of 16 dims, float32
    assert held["global"] == 4 * 212 * per_token_layer  # 53 blocks of 4 tokens, 4 layers
    # one layer of four keeps every block, three their window's blocks
    assert held["guide-full"] == (212 + 3 * 4 * window_blocks["guide-full"]) * per_token_layer < held["global"] / 3
    # four layers' windows, and per main block the room of one pooled entry of the hybrid (one run of 8 every 2 blocks)
    main_block = bytes_per_block(model.config, 4, torch.float32)
    assert main_block == per_token_layer
    assert held["guide-compressed"] == 4 * 4 * window_blocks["guide-compressed"] * per_token_layer + 53 * main_block < held["global"] / 8


def test_bench_context_prints_each_figure(tmp_path, capsys):
    from r1kit.cli import bench

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("model:\n  vocab_size: 61\n  hidden_size: 32\n  num_layers: 4\n  num_heads: 4\n  num_kv_heads: 2\n  intermediate_size: 48\n"
                   "  attention: [local, local, local, hybrid]\n  hybrid_global: compressed\n  hybrid_compress_block: 8\n  local_window: 8\n"
                   "  max_seq_len: 256\n")
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    assert bench.run(parser.parse_args(["--config", str(cfg), "--context", "48,160", "--new-tokens", "3", "--context-batch", "2"])) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["context", "prefill", "s"])
    assert "KV MiB/request" in lines[header] and "decode tok/s x2" in lines[header]
    rows = [line.split() for line in lines[header + 1 :]]
    assert [r[0] for r in rows] == ["48", "160"] and all(len(r) == 5 and all(float(x) > 0 for x in r[1:]) for r in rows)
    with pytest.raises(Exception, match="max_seq_len is 256"):
        bench.run(parser.parse_args(["--config", str(cfg), "--context", "300"]))
