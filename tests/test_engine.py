"""The engine against the reference decoding loop: same greedy tokens for batched requests of
different lengths, with chunked prefill, prefix-cache hits and preemption, for every attention and
FFN kind; the streaming interface, abort, and the errors a request can get.

Every reference runs the caller's model, which the engine copies and never touches: the plain eager
path (no packed or fused layer, no native norm, no decode kernel), checked by :func:`reference`."""

import pytest
import torch
from devices import CUDA, DEVICES
from torch import nn

from r1kit import LLM, SamplingParams
from r1kit.errors import ConfigError
from r1kit.infer.engine import EngineConfig, LLMEngine
from r1kit.infer.generate import generate
from r1kit.model import R1kitForCausalLM

GREEDY = SamplingParams(temperature=0, max_tokens=12)


def prompts_of(lengths, vocab=61, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def assert_plain(model):
    """No module of the engine's (packed or fused layers, native norms) in ``model``: it runs the eager path."""
    engine_modules = [type(m).__name__ for m in model.modules() if type(m).__module__.startswith("r1kit.infer")]
    assert not engine_modules, f"the reference model holds engine modules {engine_modules}"


def reference(model, prompts, params=GREEDY, eos_ids=()):
    assert_plain(model)
    return [generate(model, p, params, eos_ids) for p in prompts]


@pytest.mark.parametrize("attention", ["global", "local", "hybrid", ("local", "global")])
@pytest.mark.parametrize("ffn", ["dense", "topk"])
@pytest.mark.parametrize("where", ["kernel", "gather", CUDA])  # CPU decodes through the paged kernel or a gather; CUDA
def test_greedy_equals_reference_with_chunks_prefix_hits_and_preemption(tiny_config, attention, ffn, where):
    model = R1kitForCausalLM(tiny_config(attention=attention, ffn=ffn)).eval().to("cuda" if where == "cuda" else "cpu")
    prompts = prompts_of([3, 9, 17, 6, 12])
    prompts.append(prompts[2][:13] + [1, 2])  # shares 3 full blocks with the 17-token prompt
    want = reference(model, prompts)
    # 14 blocks of 4 tokens cannot hold six requests of up to 29 tokens: decodes must preempt
    llm = LLM(model, block_size=4, num_kv_blocks=14, max_num_batched_tokens=10, decode_kernel=where != "gather")
    # decodes read the pool in place through the C kernel (CPU) or the Triton one (CUDA), or gather
    assert (llm.llm_engine.runner.pool.decode_kernel is not None) == (where != "gather")
    first = llm.generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in first] == want
    # (an all-local model frees the blocks its window has left, and fits without preempting)
    assert llm.llm_engine.scheduler.num_preemptions > 0 or attention == "local"
    second = llm.generate(prompts, GREEDY)  # the same prompts again: their prefixes are cached
    assert [o.outputs[0].token_ids for o in second] == want
    # (an all-local model's prompt heads leave the window first, so the tight pool evicts them first)
    assert sum(o.num_cached_tokens for o in second) > 0 or attention == "local"
    assert all(o.num_cached_tokens <= len(p) - 1 for o, p in zip(second, prompts))
    engine = llm.llm_engine
    engine.block_manager.check_invariants()
    assert engine.block_manager.num_free_blocks == engine.num_blocks  # nothing leaked


def test_one_big_prefill_batch_and_per_request_windows(tiny_config):
    # window growth gives the 3-token and the 40-token prompt different local windows in one batch
    cfg = tiny_config(attention=["local", "hybrid"], window_growth="proportional", window_growth_ratio=2, max_local_window=64)
    model = R1kitForCausalLM(cfg).eval()
    prompts = prompts_of([3, 40, 11])
    assert cfg.window_for(3) != cfg.window_for(40)
    llm = LLM(model, block_size=8, num_kv_blocks=64, max_num_batched_tokens=512)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)] == reference(model, prompts)
    # a prefix cached under one window is not served to a request with another window
    longer = [prompts[1] + prompts[1][:30]]
    out = llm.generate(longer, GREEDY)
    assert cfg.window_for(70) != cfg.window_for(40) and out[0].num_cached_tokens == 0
    assert out[0].outputs[0].token_ids == reference(model, longer)[0]


def test_eos_and_stop_ids_end_requests_like_the_reference(tiny_config):
    model = R1kitForCausalLM(tiny_config(eos_token_id=5)).eval()
    prompts = prompts_of([4, 7, 9], seed=3)
    params = SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[9])
    want = reference(model, prompts, params, eos_ids=[5])
    outs = LLM(model, block_size=4, num_kv_blocks=64).generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outs] == want
    for o in outs:
        ids = o.outputs[0].token_ids
        if ids[-1] == 9:
            assert (o.outputs[0].finish_reason, o.outputs[0].stop_reason) == ("stop", 9)
        elif ids[-1] == 5:
            assert (o.outputs[0].finish_reason, o.outputs[0].stop_reason) == ("stop", None)
        else:
            assert o.outputs[0].finish_reason == "length" and len(ids) == 30


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_sampling_matches_reference_whatever_the_batch(tiny_config, device):
    model = R1kitForCausalLM(tiny_config(attention="hybrid")).eval().to(device)
    params = SamplingParams(temperature=1.3, top_k=20, top_p=0.9, repetition_penalty=1.1, max_tokens=16, seed=7)
    prompt = prompts_of([6])[0]
    [want] = reference(model, [prompt], params)
    llm = LLM(model, block_size=4, num_kv_blocks=64)
    alone = llm.generate([prompt], params)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=10)] * 3
    crowded = llm.generate(prompts_of([5, 8, 2], seed=9) + [prompt], others + [params])[-1].outputs[0].token_ids
    assert alone == crowded == want


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_runs_and_mostly_agrees(tiny_config, device):
    model = R1kitForCausalLM(tiny_config(attention="hybrid", ffn="topk")).eval().to(device, torch.bfloat16)
    prompts = prompts_of([5, 9])
    outs = LLM(model, block_size=4, num_kv_blocks=32).generate(prompts, GREEDY)
    want = reference(model, prompts)
    for o, w in zip(outs, want):
        assert len(o.outputs[0].token_ids) == 12 and o.outputs[0].token_ids[:3] == w[:3]


def test_streaming_steps_abort_and_new_requests_joining(tiny_config):
    model = R1kitForCausalLM(tiny_config()).eval()
    engine = LLMEngine(model, config=EngineConfig(block_size=4, num_kv_blocks=40))
    a, b = prompts_of([5, 7])
    engine.add_request("a", a, SamplingParams(temperature=0, max_tokens=20))
    engine.add_request("b", {"prompt_token_ids": b}, SamplingParams(temperature=0, max_tokens=20))
    deltas: dict[str, list[int]] = {"a": [], "b": [], "c": []}
    for _ in range(3):
        for out in engine.step():
            deltas[out.request_id] += out.outputs[0].delta_token_ids
    assert len(deltas["a"]) == 3 and engine.block_manager.num_free_blocks < engine.num_blocks
    assert engine.abort("b") and not engine.abort("nope")
    engine.add_request("c", b, SamplingParams(temperature=0, max_tokens=5))  # joins mid-flight
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id != "b"
            deltas[out.request_id] += out.outputs[0].delta_token_ids
            if out.finished:
                finals[out.request_id] = out.outputs[0].token_ids
    assert [deltas["a"]] == [finals["a"]] == reference(model, [a], SamplingParams(temperature=0, max_tokens=20))
    assert [deltas["c"]] == [finals["c"]] == reference(model, [b], SamplingParams(temperature=0, max_tokens=5))
    assert engine.block_manager.num_free_blocks == engine.num_blocks
    engine.block_manager.check_invariants()


def test_abort_frees_every_block(tiny_config):
    model = R1kitForCausalLM(tiny_config()).eval()
    engine = LLMEngine(model, config=EngineConfig(block_size=4, num_kv_blocks=40, enable_prefix_caching=False))
    for i, p in enumerate(prompts_of([9, 14, 3])):
        engine.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=8, n=2))
    engine.step()
    engine.step()
    in_use = engine.num_blocks - engine.block_manager.num_free_blocks
    assert in_use > 0
    for i in range(3):
        engine.abort(str(i))
    assert engine.block_manager.num_free_blocks == engine.num_blocks and not engine.has_unfinished_requests()
    assert not engine.scheduler.has_unfinished()
    engine.block_manager.check_invariants()


def test_requests_that_cannot_fit_are_refused_clearly(tiny_config):
    model = R1kitForCausalLM(tiny_config(max_seq_len=64)).eval()
    llm = LLM(model, block_size=4, num_kv_blocks=8)
    with pytest.raises(ConfigError, match="exceeds the model's max_seq_len=64"):
        llm.generate([[1] * 60], SamplingParams(max_tokens=10))
    with pytest.raises(ConfigError, match="KV cache holds 32 tokens"):
        llm.generate([[1] * 30], SamplingParams(max_tokens=10))
    with pytest.raises(ConfigError, match="prompt is empty"):
        llm.generate([[]], SamplingParams())
    with pytest.raises(ConfigError, match="needs a tokenizer"):
        llm.generate(["hello"], SamplingParams())
    with pytest.raises(ConfigError, match="vocabulary|must be in"):
        llm.generate([[70]], SamplingParams())
    with pytest.raises(ConfigError, match="stop_token_ids must be in"):
        llm.generate([[1]], SamplingParams(stop_token_ids=[61], min_tokens=1))
    with pytest.raises(ConfigError, match="exceeds max_num_seqs"):
        LLM(model, num_kv_blocks=8, max_num_seqs=2).generate([[1]], SamplingParams(n=3))
    assert not llm.llm_engine.has_unfinished_requests()
    with pytest.raises(ConfigError, match="hybrid_compress_block=6: one must divide the other"):
        LLM(R1kitForCausalLM(tiny_config(attention="hybrid", hybrid_global="compressed", hybrid_compress_block=6)), block_size=4)
    with pytest.raises(ConfigError, match="unknown LLM arguments"):
        LLM(model, blok_size=4)


def test_hard_gated_hybrid_equals_the_reference(tiny_config):
    model = R1kitForCausalLM(tiny_config(attention="hybrid", ffn="topk", hybrid_gate_threshold=0.5)).eval()
    prompts = [[3, 14, 15, 9, 2, 6, 5, 3, 5], [8, 9, 7], list(range(1, 20))]
    assert [o.outputs[0].token_ids for o in LLM(model, num_kv_blocks=64).generate(prompts, GREEDY)] == reference(model, prompts)


def test_memory_budget_sizes_the_pool(tiny_config):
    model = R1kitForCausalLM(tiny_config()).eval()
    # 2 layers × K,V × 16 tokens × 2 heads × 8 dims × 4 bytes = 4 KiB per block
    llm = LLM(model, kv_cache_memory=10 * 4096)
    assert llm.llm_engine.num_blocks == 10 and llm.llm_engine.runner.pool.nbytes == 10 * 4096


def test_random_workload_with_arrivals_aborts_and_preemption(tiny_config):
    """Requests arrive between steps, some are aborted, the pool is tight: no crash, no leak, and every
    greedy request that ran to the end equals the reference."""
    import random

    rnd = random.Random(0)
    model = R1kitForCausalLM(tiny_config(attention=["local", "hybrid"], eos_token_id=3)).eval()
    engine = LLMEngine(model, config=EngineConfig(block_size=4, num_kv_blocks=20, max_num_batched_tokens=16, max_num_seqs=5))
    pending = [(f"r{i}", prompts_of([rnd.randint(1, 30)], seed=i)[0]) for i in range(24)]
    params = {}
    finished = {}
    aborted = set()
    while pending or engine.has_unfinished_requests():
        for _ in range(rnd.randint(0, 2)):
            if pending:
                rid, prompt = pending.pop()
                p = SamplingParams(temperature=0, max_tokens=rnd.randint(1, 20), n=rnd.choice([1, 1, 2]))
                if rnd.random() < 0.3:
                    p = p.replace(temperature=0.8, seed=rnd.randint(0, 99))
                params[rid] = (prompt, p)
                engine.add_request(rid, prompt, p)
        if engine.requests and rnd.random() < 0.05:
            rid = rnd.choice(sorted(engine.requests))
            engine.abort(rid)
            aborted.add(rid)
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        engine.block_manager.check_invariants()
    assert set(finished) | aborted == set(params) and engine.scheduler.num_preemptions > 0
    assert engine.block_manager.num_free_blocks == engine.num_blocks
    for rid, out in finished.items():
        prompt, p = params[rid]
        assert len(out.outputs) == p.n
        if p.greedy:
            [want] = reference(model, [prompt], p, eos_ids=[3])
            assert all(o.token_ids == want for o in out.outputs)


def test_all_local_model_frees_blocks_its_window_has_left(tiny_config):
    model = R1kitForCausalLM(tiny_config(attention="local", local_window=5)).eval()
    engine = LLMEngine(model, config=EngineConfig(block_size=4, num_kv_blocks=40, max_num_batched_tokens=8))
    prompts = prompts_of([30, 7])
    params = SamplingParams(temperature=0, max_tokens=40)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    most, done = 0, {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        live = [s for s in engine.scheduler.running if s.num_computed_tokens > 8]
        most = max([most] + [sum(b >= 0 for b in s.block_table) for s in live])
    # window 5 + the next token and a chunk of up to 8 fit in at most 5 blocks of 4, out of up to 18 per sequence
    assert 0 < most <= 5
    assert [done["0"], done["1"]] == reference(model, prompts, params)
    assert engine.block_manager.num_free_blocks == engine.num_blocks
    engine.block_manager.check_invariants()
    # and the freed blocks still serve prefix hits
    again = LLM.__new__(LLM)
    again.llm_engine = engine
    out = again.generate(prompts[:1], params)[0]
    assert out.num_cached_tokens == 28 and out.outputs[0].token_ids == done["0"]


@pytest.mark.parametrize("attention", ["global", ("local", "hybrid")])
def test_a_step_mixing_prefills_and_decodes_is_one_forward(tiny_config, attention):
    """Decodes, a one-token prompt and prefill chunks of different lengths packed in one row: one model
    call per step, the same tokens and prompt logprobs as each request alone."""
    model = R1kitForCausalLM(tiny_config(attention=attention)).eval()
    a, b, c, d = prompts_of([6, 11, 1, 8])
    want = dict(zip("abc", reference(model, [a, b, c])))
    with torch.no_grad():
        ref_d = model(torch.tensor([d]))[0].log_softmax(-1)
    # without the one-call step, which takes the steps of decodes alone and would leave them no forward to count
    engine = LLMEngine(model, config=EngineConfig(block_size=4, num_kv_blocks=64, max_num_batched_tokens=9, decode_step=False))
    calls, real_forward = [], engine.model.forward

    def counting_forward(*args, **kwargs):
        calls.append(1)
        return real_forward(*args, **kwargs)

    engine.model.forward = counting_forward
    engine.add_request("a", a, GREEDY)
    engine.step()  # a's prompt
    engine.add_request("b", b, GREEDY)  # 11 tokens: chunked over two steps by the budget of 9
    engine.add_request("c", c, GREEDY)
    engine.add_request("d", d, SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=1))
    got: dict[str, list[int]] = {}
    mixed_steps = 0
    while engine.has_unfinished_requests():
        running = engine.scheduler.running
        mixed = any(s.num_uncomputed == 1 for s in running) and any(s.num_uncomputed > 1 for s in running)
        before = len(calls)
        for out in engine.step():
            if out.finished:
                got[out.request_id] = out.outputs[0].token_ids
                if out.request_id == "d":
                    logprobs = out.prompt_logprobs
        assert len(calls) - before == 1  # one forward per step, whatever it holds
        mixed_steps += mixed
    assert mixed_steps > 0
    assert {k: got[k] for k in want} == want and [got["d"]] == reference(model, [d], SamplingParams(temperature=0, max_tokens=3))
    for i in range(1, len(d)):
        assert abs(logprobs[i][d[i]].logprob - float(ref_d[i - 1, d[i]])) < 1e-4


def test_packed_batch_wants_one_token_rows_first(tiny_config):
    from r1kit.infer.paged_cache import KVPool, PackedBatch

    cfg = tiny_config()
    pool = KVPool(cfg, num_blocks=4, block_size=4, dtype=torch.float32, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="one token must come first"):
        PackedBatch(pool, [([0], 0, 3, 4), ([1], 2, 1, 4)], torch.device("cpu"))


def test_the_paged_views_implement_the_cache_protocol_and_its_order(tiny_config):
    """Both views the engine hands the model declare every call of the model's KVCacheView; a packed
    step's attend checks that it follows the update of the same layer."""
    from r1kit.infer.paged_cache import KVPool, PackedBatch, PagedBatch
    from r1kit.model import KVCacheView

    cfg, cpu = tiny_config(), torch.device("cpu")
    pool = KVPool(cfg, num_blocks=8, block_size=4, dtype=torch.float32, device=cpu)
    single = PagedBatch(pool, [[0]], [2], [1], [4], cpu)
    packed = PackedBatch(pool, [([1], 0, 1, 4), ([2, 3], 0, 5, 4)], cpu)
    assert isinstance(single, KVCacheView) and isinstance(packed, KVCacheView)
    assert packed.rope_store_attend(0, "global", torch.zeros(1, 6, 64), None, None, 4) is None
    k = torch.randn(1, 2, 6, 8)
    packed.update(0, k, k)
    q = torch.randn(1, 4, 6, 8)
    assert packed.attend(0, "global", q, k, k).shape == q.shape
    with pytest.raises(RuntimeError, match="attend\\(\\) of layer 1 after update\\(\\) of layer 0"):
        packed.attend(1, "global", q, k, k)
    with pytest.raises(ConfigError, match="hybrid_global=compressed"):
        packed.attend(0, "compressed", q, k, k)


@pytest.mark.parametrize("pack_weights", [True, False])
def test_the_callers_model_still_trains_after_an_engine_took_its_weights(tiny_config, pack_weights):
    """The engine runs its own copy: the caller's layers stay the model's own (plain q/k/v projections
    and RMSNorms), a backward pass and an optimizer step work, and the engine keeps its weights."""
    from r1kit.model.attention import Attention
    from r1kit.model.transformer import RMSNorm

    model = R1kitForCausalLM(tiny_config(attention=("global", "hybrid"), ffn=("dense", "topk"))).eval()
    layers = list(model.modules())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    llm = LLM(model, block_size=4, num_kv_blocks=16, pack_weights=pack_weights)
    engine_out = llm.generate([[3, 1, 4, 1, 5]], GREEDY)[0].outputs[0].token_ids
    assert list(model.modules()) == layers and llm.llm_engine.model is not model
    for layer in model.model.layers:
        attn = layer.self_attn
        assert type(attn) is Attention and all(type(getattr(attn, p)) is nn.Linear for p in ("q_proj", "k_proj", "v_proj"))
        assert type(layer.input_layernorm) is RMSNorm and type(layer.post_attention_layernorm) is RMSNorm
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    model(tokens).logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    optimizer.step()
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, before["model.layers.0.self_attn.q_proj.weight"])
    # the engine's copy did not move with the caller's weights
    assert llm.generate([[3, 1, 4, 1, 5]], GREEDY)[0].outputs[0].token_ids == engine_out


def test_take_model_hands_the_model_over_without_a_copy(tiny_config):
    model = R1kitForCausalLM(tiny_config()).eval()
    [want] = reference(model, [[3, 1, 4, 1, 5]])
    engine = LLMEngine(model, config=EngineConfig(block_size=4, num_kv_blocks=16), take_model=True)
    assert engine.model is model
    engine.add_request("a", [3, 1, 4, 1, 5], GREEDY)
    while engine.has_unfinished_requests():
        out = engine.step()
    assert out[0].outputs[0].token_ids == want
