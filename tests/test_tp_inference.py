"""Tensor-parallel inference: 2 CPU processes (gloo) against single-process references.

One tiny model covers every layer kind at once (global, local and per-head-gated hybrid attention,
dense and Top-K FFNs, float and int4 GPTQ layers, a vocabulary that 2 does not divide), and one
tensor-parallel engine over it serves most checks: starting processes dominates the cost.
"""

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

from r1kit import LLM, SamplingParams
from r1kit.config import ModelConfig
from r1kit.errors import ConfigError
from r1kit.infer.generate import generate
from r1kit.infer.tensor_parallel import EngineDeadError
from r1kit.infer.tensor_parallel.sharding import check_shardable, split_columns, split_rows
from r1kit.model import R1kitForCausalLM
from r1kit.quant import QuantConfig, quantize_model, to_quantized
from r1kit.quant.int4_linear import QuantLinear

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
VOCAB = 61


def mixed_config(**overrides) -> ModelConfig:
    """head_dim 32: a rank's k/v int4 shard (32 outputs) runs r1kit's int4 kernel as the whole layer does
    (16 outputs would take torch's, whose rounding differs by ~1e-3 in a logprob)."""
    base = dict(vocab_size=VOCAB, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=128, max_seq_len=128,
                attention=["global", "local", "hybrid", "hybrid"], ffn=["dense", "topk", "dense", "topk"], topk_sparsity=0.5,
                hybrid_gate="head", local_window=4, head_dim=32)  # fmt: skip
    base.update(overrides)
    return ModelConfig(**base)


def prompts_of(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def reference(model, prompts, params=GREEDY):
    return [generate(model, p, params) for p in prompts]


@pytest.fixture(scope="module")
def mixed_model():
    """Layers 0-1 float (global/dense, local/Top-K), layers 2-3 int4 RTN (hybrid/dense, hybrid/Top-K)."""
    torch.manual_seed(0)
    model = R1kitForCausalLM(mixed_config()).eval()
    qc = QuantConfig(group_size=32, method="rtn")
    results = {name: r for name, r in quantize_model(model, qc).items() if int(name.split(".")[2]) >= 2}
    to_quantized(model, results, qc)
    assert isinstance(model.model.layers[3].mlp.down_proj, QuantLinear) and not isinstance(model.model.layers[0].mlp.down_proj, QuantLinear)
    return model


@pytest.fixture(scope="module")
def tp_llm(mixed_model):
    # a small step budget: prompts are prefilled in chunks, and steps mix prefills with decodes
    llm = LLM(mixed_model, tensor_parallel_size=2, block_size=4, num_kv_blocks=64, max_num_batched_tokens=16)
    yield llm
    llm.close()


def test_greedy_generations_equal_the_single_process_reference(tp_llm, mixed_model):
    prompts = prompts_of([3, 9, 17, 30])
    prompts.append(prompts[3][:20] + [5, 6])  # shares prefix blocks with the 30-token prompt
    got = [o.outputs[0].token_ids for o in tp_llm.generate(prompts, GREEDY)]
    assert got == reference(mixed_model, prompts)
    assert tp_llm.llm_engine.workers.size == 2
    # each rank's pool holds its half of the K/V heads
    assert tp_llm.llm_engine.runner.pool.k[0].shape[1] == 1 and tp_llm.llm_engine.model.config.num_kv_heads == 1


def test_logprobs_gathered_from_both_vocabulary_halves_match_a_full_forward(tp_llm, mixed_model):
    prompt = prompts_of([12], seed=3)[0]
    out = tp_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, logprobs=2, prompt_logprobs=2))[0]
    tokens = prompt + out.outputs[0].token_ids
    with torch.no_grad():
        expected = torch.log_softmax(mixed_model(torch.tensor([tokens]))[0].float(), dim=-1)  # the plain model, every position
    for pos in range(1, len(prompt)):
        assert out.prompt_logprobs[pos][prompt[pos]].logprob == pytest.approx(expected[pos - 1, prompt[pos]].item(), abs=1e-4)
    for i, entry in enumerate(out.outputs[0].logprobs):  # greedy: the chosen token, then the runner-up
        top = expected[len(prompt) - 1 + i].topk(2)
        assert list(entry) == top.indices.tolist()
        assert [e.logprob for e in entry.values()] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_an_abort_on_rank_0_frees_the_blocks_every_rank_indexes(tp_llm, mixed_model):
    engine = tp_llm.llm_engine
    free = engine.block_manager.num_free_blocks
    prompts = prompts_of([14, 22], seed=7)
    for i, p in enumerate(prompts):
        engine.add_request(f"abort-{i}", p, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    for _ in range(4):
        engine.step()
    assert engine.block_manager.num_free_blocks < free
    for i in range(len(prompts)):
        assert engine.abort(f"abort-{i}")
    assert engine.block_manager.num_free_blocks == free and not engine.has_unfinished_requests()
    engine.block_manager.check_invariants()
    # the freed blocks serve new requests on every rank: the workers kept nothing of the aborted ones
    again = prompts_of([13, 21], seed=8)
    assert [o.outputs[0].token_ids for o in tp_llm.generate(again, GREEDY)] == reference(mixed_model, again)


def test_a_killed_worker_ends_generate_with_an_error_naming_its_rank(tiny_config):
    torch.manual_seed(0)
    model = R1kitForCausalLM(tiny_config(num_layers=1, max_seq_len=1024)).eval()
    llm = LLM(model, tensor_parallel_size=2, block_size=4, num_kv_blocks=600)
    worker = llm.llm_engine.workers.processes[0]
    killed = []
    # mid-generation (hundreds of steps to go): rank 0 is in a step's collectives or about to start one
    threading.Timer(0.5, lambda: (killed.append(time.monotonic()), os.kill(worker.pid, signal.SIGKILL))).start()
    long = SamplingParams(temperature=0, max_tokens=1000, ignore_eos=True)
    try:
        with pytest.raises(EngineDeadError, match="worker rank 1 .* was killed by SIGKILL"):
            llm.generate(prompts_of([5, 7]), long)
        assert time.monotonic() - killed[0] < 5
        assert not llm.llm_engine.has_unfinished_requests()
        with pytest.raises(EngineDeadError, match="rank 1"):  # and every later call, at once
            llm.generate([[1, 2, 3]], GREEDY)
    finally:
        llm.close()


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_layers_split_along_their_groups_dequantize_to_the_full_layers_slices(bits):
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 64)
    qc = QuantConfig(group_size=32, method="rtn", bits=bits)
    from r1kit.quant.rtn import quantize_rtn

    result = quantize_rtn(linear.weight, qc)
    layer = QuantLinear.from_packed(result.pack(qc), 128, 64, 32, bias=linear.bias.detach(), bits=bits)
    full = layer.dequantized_weight()  # [out, in]
    columns = split_columns(layer, 16, 48, "x")
    assert torch.equal(columns.dequantized_weight(), full[16:48]) and torch.equal(columns.bias, layer.bias[16:48])
    for rank, (lo, hi) in enumerate([(0, 64), (64, 128)]):
        rows = split_rows(layer, lo, hi, rank, "x")
        assert torch.equal(rows.dequantized_weight(), full[:, lo:hi])
        assert (rows.bias is not None) == (rank == 0)  # the partial sums add the bias once
        x = torch.randn(3, 64)
        assert torch.allclose(rows.forward_dequant(x), x @ full[:, lo:hi].T + (layer.bias if rank == 0 else 0), atol=1e-5)
    with pytest.raises(ConfigError, match="inside a quantization group"):
        split_rows(layer, 48, 96, 1, "model.layers.0.mlp.down_proj")
    act_order = QuantLinear.from_packed({**result.pack(qc), "g_idx": torch.arange(128, dtype=torch.int32).flip(0) // 32}, 128, 64, 32, bits=bits)
    with pytest.raises(ConfigError, match="act-order"):
        split_rows(act_order, 0, 64, 0, "model.layers.0.mlp.down_proj")


def test_what_cannot_be_split_is_refused_clearly():
    with pytest.raises(ConfigError, match="must divide num_kv_heads=2"):
        check_shardable(mixed_config(), 4)
    with pytest.raises(ConfigError, match="hard gate's decision spans every head"):
        check_shardable(mixed_config(hybrid_gate_threshold=0.9), 2)
    check_shardable(mixed_config(hybrid_gate="token", hybrid_gate_threshold=0.9), 2)  # one gate per token: every rank decides alike
    with pytest.raises(ConfigError, match="tensor_parallel_size=0"):
        LLM(R1kitForCausalLM(mixed_config()), tensor_parallel_size=0)


def test_serve_with_tensor_parallel_size_2_answers_then_stops_when_a_worker_dies(tmp_path):
    from r1kit.tokenizer import EOS, load_tokenizer, train_tokenizer

    tok = train_tokenizer([open(m.__file__).read() for m in (subprocess, threading)], vocab_size=300)
    tok.save(str(tmp_path / "tokenizer.json"))
    torch.manual_seed(0)
    cfg = mixed_config(vocab_size=tok.get_vocab_size(), eos_token_id=tok.token_to_id(EOS))
    R1kitForCausalLM(cfg).save_pretrained(tmp_path)
    port = free_port()
    with open(tmp_path / "server.log", "w+") as log:
        proc = subprocess.Popen([sys.executable, "-m", "r1kit.cli", "serve", "--model", str(tmp_path), "--port", str(port),
                                 "--kv-cache-memory", str(4 << 20), "--tensor-parallel-size", "2"],
                                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(proc, base, log)
            chat = httpx.post(base + "/v1/chat/completions", timeout=60, json={
                "model": tmp_path.name, "messages": [{"role": "user", "content": "def add(a, b):"}], "max_tokens": 6, "temperature": 0})
            assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] == 6
            r = httpx.post(base + "/v1/completions", timeout=60, json={
                "model": tmp_path.name, "prompt": "import os\n", "max_tokens": 8, "temperature": 0, "ignore_eos": True})
            ids = load_tokenizer(tmp_path).encode("import os\n", add_special_tokens=False).ids
            expected = generate(R1kitForCausalLM.from_pretrained(tmp_path), ids, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
            assert r.json()["choices"][0]["text"] == tok.decode(expected, skip_special_tokens=True)
            # an idle server whose worker dies stops, saying which rank
            import psutil

            (worker,) = [c for c in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(c.cmdline())]
            worker.kill()
            assert proc.wait(timeout=20) != 0
            log.seek(0)
            assert "tensor-parallel worker rank 1" in log.read()
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc, base, log, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(log.read())
        time.sleep(0.2)
    raise RuntimeError("the server did not become healthy")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="tensor parallelism on CUDA needs two GPUs (NCCL, one GPU a rank)")
def test_cuda_two_gpus_greedy_generations_equal_the_reference():
    torch.manual_seed(0)
    model = R1kitForCausalLM(mixed_config()).eval().to("cuda")
    prompts = prompts_of([3, 17, 30])
    with LLM(model, tensor_parallel_size=2, block_size=4, num_kv_blocks=64) as llm:
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)] == reference(model, prompts)
        assert llm.llm_engine.model.device == torch.device("cuda", 0)
