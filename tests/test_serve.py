"""The HTTP server through real clients on real sockets: the official `openai` client and httpx."""

import asyncio
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from r1kit.config import ModelConfig
from r1kit.errors import ConfigError
from r1kit.infer.sampling import SamplingParams
from r1kit.tokenizer import EOS, load_tokenizer, train_tokenizer
from r1kit.model import R1kitForCausalLM
from r1kit.checkpoints import load_model
from r1kit.serve.app import ServerState, build_app
from r1kit.serve.reasoning import ReasoningStream, split_reasoning


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("served") / "tiny-r1"
    out.mkdir()
    texts = [Path(m.__file__).read_text() for m in (json, socket, subprocess)]
    tok = train_tokenizer(texts, vocab_size=400)
    tok.save(str(out / "tokenizer.json"))
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                      max_seq_len=512, attention=["local", "hybrid"], ffn="topk", local_window=16, eos_token_id=tok.token_to_id(EOS))  # fmt: skip
    torch.manual_seed(0)
    R1kitForCausalLM(cfg).save_pretrained(out)
    return out


def launch_server(model_dir, *extra, env=None):
    """``r1kit serve`` in a subprocess, not yet waited for (start several, then wait: start-up is most of their cost)."""
    port = free_port()
    # a file, not a pipe: a full pipe would block the server
    log = tempfile.NamedTemporaryFile("w+", prefix=f"r1kit-server-{port}-", suffix=".log", delete=False)
    proc = subprocess.Popen(
        [sys.executable, "-m", "r1kit.cli", "serve", "--model", str(model_dir), "--port", str(port), "--kv-cache-memory", str(16 << 20), *extra],
        stdout=log, stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )  # fmt: skip
    proc.log, proc.base, proc.port = log, f"http://127.0.0.1:{port}", port
    return proc


def wait_healthy(proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(proc.base + "/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            proc.log.seek(0)
            raise RuntimeError(proc.log.read())
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not become healthy")


def start_server(model_dir, *extra):
    proc = wait_healthy(launch_server(model_dir, *extra))
    return proc, proc.base


@pytest.fixture(scope="module")
def server(model_dir):
    proc, base = start_server(model_dir)
    yield base
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)


# -- the reasoning parser on its own ---------------------------------------------------------------
@pytest.mark.parametrize(
    "text,expected",
    [("abc</think>answer", ("abc", "answer")), ("<think>abc</think>x", ("abc", "x")), ("cut off", ("cut off", None)), ("</think>only", (None, "only"))],
)
def test_split_reasoning(text, expected):
    assert split_reasoning(text) == expected


@pytest.mark.parametrize(
    "text,expected",
    [("abc</think>answer", (None, "abc</think>answer")), ("<think>abc</think>x", ("abc", "x")), ("<think>cut off", ("cut off", None)), ("x<think>y", (None, "x<think>y"))],
)
def test_split_reasoning_after_a_prompt_that_does_not_open_think(text, expected):
    """Content, unless the model opens <think> itself (a ChatML template: SmolLM2, Qwen2.5)."""
    assert split_reasoning(text, in_reasoning=False) == expected


@pytest.mark.parametrize("in_reasoning", [True, False])
@pytest.mark.parametrize("text", ["<think>plan</think>answer", "a</think>b", "no end", "x</th", "</think>", "<thi", "<think>a</th"])
def test_streaming_reasoning_equals_whole_text_for_every_split(text, in_reasoning):
    whole = split_reasoning(text, in_reasoning)
    for cut in range(len(text) + 1):
        stream = ReasoningStream(in_reasoning)
        parts = [stream.feed(text[:cut]), stream.feed(text[cut:], final=True)]
        reasoning, content = "".join(p[0] for p in parts), "".join(p[1] for p in parts)
        assert (reasoning or None, content or None) == whole, (text, cut)


# -- the API -----------------------------------------------------------------------------------------
def test_health_is_503_while_loading_and_models_list(server):
    async def loading():
        app = build_app(ServerState(model_name="m"))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return [
                (await c.get("/health")).status_code,
                (await c.post("/v1/completions", json={"prompt": "x"})).status_code,
                (await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})).status_code,
                (await c.post("/tokenize", json={"prompt": "x"})).status_code,
                (await c.post("/detokenize", json={"tokens": [1]})).status_code,
            ]

    assert asyncio.run(loading()) == [503] * 5
    assert httpx.get(server + "/health").json() == {"status": "ok"}
    assert [m["id"] for m in httpx.get(server + "/v1/models").json()["data"]] == ["tiny-r1"]


def test_completion_equals_the_reference_decoder(client, model_dir):
    from r1kit.infer.generate import generate
    from r1kit.infer.sampling import SamplingParams

    r = client.completions.create(model="tiny-r1", prompt="import os\n", max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    tok = load_tokenizer(model_dir)
    ids = tok.encode("import os\n", add_special_tokens=False).ids
    expected = generate(load_model(model_dir), ids, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert r.choices[0].text == tok.decode(expected, skip_special_tokens=True)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 12 and r.usage.prompt_tokens == len(ids)


def test_chat_reasoning_streaming_and_usage(client):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "def add(a, b):"}]
    whole = client.chat.completions.create(model="tiny-r1", messages=messages, max_tokens=10, temperature=0)
    msg = whole.choices[0].message
    # the prompt ends with <think>\n: an output without </think> is all reasoning (DeepSeek-R1's rule)
    extra = msg.model_extra
    text = (extra.get("reasoning_content") or "") + ("</think>" + msg.content if msg.content is not None else "")
    assert extra.get("reasoning") == extra.get("reasoning_content")
    chunks = list(client.chat.completions.create(model="tiny-r1", messages=messages, max_tokens=10, temperature=0, stream=True, stream_options={"include_usage": True}))
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks if c.choices)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert reasoning + ("</think>" + content if msg.content is not None else "") == text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 10 and chunks[-1].choices == []
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


@pytest.mark.parametrize("stream", [False, True])
def test_an_r1_prompt_still_splits_at_think_end(client, model_dir, stream):
    """The default template ends the prompt with <think>\\n: what precedes </think> is reasoning (here nothing)."""
    from r1kit.tokenizer import END_THINK

    end = load_tokenizer(model_dir).token_to_id(END_THINK)
    body = dict(model="tiny-r1", messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0, logit_bias={str(end): 100})
    if stream:
        deltas = [c.choices[0].delta for c in client.chat.completions.create(**body, stream=True) if c.choices]
        reasoning = "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) or None
        content = "".join(d.content or "" for d in deltas)
    else:
        message = client.chat.completions.create(**body).choices[0].message
        reasoning, content = message.model_extra.get("reasoning_content"), message.content
    assert (reasoning, content) == (None, END_THINK * 2)


def test_stop_strings_seed_and_n(client):
    base = dict(model="tiny-r1", prompt="class A:", max_tokens=30, temperature=1.0, seed=7, extra_body={"ignore_eos": True})
    a, b = client.completions.create(**base), client.completions.create(**base)
    assert a.choices[0].text == b.choices[0].text
    c = client.completions.create(**{**base, "seed": 8})
    assert c.choices[0].text != a.choices[0].text
    text = a.choices[0].text
    stop = text[5:8]
    cut = client.completions.create(**base, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and stop not in cut.choices[0].text and text.startswith(cut.choices[0].text)
    several = client.completions.create(**{**base, "n": 3})
    assert sorted(ch.index for ch in several.choices) == [0, 1, 2]


def test_logprobs_and_lm_eval_loglikelihood(client, model_dir, server):
    chat = client.chat.completions.create(model="tiny-r1", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
    entries = chat.choices[0].logprobs.content
    assert len(entries) == 4 and all(len(e.top_logprobs) == 3 and e.logprob <= 0 for e in entries)
    assert all(e.logprob == pytest.approx(e.top_logprobs[0].logprob) for e in entries)  # greedy picks the top token
    tok = load_tokenizer(model_dir)
    ids = tok.encode("for i in range(10):\n    print(i)", add_special_tokens=False).ids
    r = httpx.post(server + "/v1/completions", json={"model": "tiny-r1", "prompt": ids, "echo": True, "logprobs": 1, "max_tokens": 0, "temperature": 0}).json()
    lp = r["choices"][0]["logprobs"]["token_logprobs"]
    assert lp[0] is None and len(lp) == len(ids)
    with torch.no_grad():
        expected = torch.log_softmax(load_model(model_dir)(torch.tensor([ids]))[0].double(), -1)
    for pos in range(1, len(ids)):
        assert lp[pos] == pytest.approx(float(expected[pos - 1, ids[pos]]), abs=1e-4)


def test_streamed_completion_logprobs_equal_the_whole_response(client):
    body = dict(model="tiny-r1", prompt="import sys", max_tokens=6, temperature=0, logprobs=2, extra_body={"ignore_eos": True})
    whole = client.completions.create(**body).choices[0].logprobs
    chunks = [c.choices[0].logprobs for c in client.completions.create(**body, stream=True) if c.choices and c.choices[0].logprobs]
    streamed = [lp for chunk in chunks for lp in chunk.token_logprobs]
    assert streamed == pytest.approx(whole.token_logprobs) and len(streamed) == 6


def test_tokenize_detokenize(server):
    ids = httpx.post(server + "/tokenize", json={"prompt": "hello world"}).json()["tokens"]
    assert httpx.post(server + "/detokenize", json={"tokens": ids}).json()["prompt"] == "hello world"
    chat = httpx.post(server + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] > len(ids) - 2 and chat["max_model_len"] == 512


# one bad value per SamplingParams field (floats where the field is a float: the JSON round trip
# makes them floats, and the message quotes the value)
SAMPLING_ERRORS = [
    ("temperature", -1.0), ("top_p", 0.0), ("top_p", 2.0), ("top_k", -2), ("min_p", 1.5), ("repetition_penalty", 0.0),
    ("presence_penalty", 3.0), ("frequency_penalty", -3.0), ("n", 0), ("max_tokens", -1), ("min_tokens", 100), ("seed", -1),
    ("seed", 2**63), ("logprobs", 21), ("thinking_budget", -1), ("stop", [""]), ("stop", ""), ("logit_bias", {"abc": 1.0}),
    ("logit_bias", {"--5": 1.0}), ("logit_bias", {"1": 101.0}),
]  # fmt: skip


@pytest.mark.parametrize("field,value", SAMPLING_ERRORS)
def test_a_bad_sampling_value_is_the_same_error_over_http_and_in_python(server, field, value):
    with pytest.raises(ConfigError) as info:
        SamplingParams(**{"max_tokens": 4, field: value})
    assert info.value.param == field
    r = httpx.post(server + "/v1/completions", json={"model": "tiny-r1", "prompt": "x", "max_tokens": 4, field: value})
    assert r.status_code == 400, r.text
    assert r.json()["error"] == {"message": str(info.value), "type": "invalid_request_error", "param": field, "code": None}


@pytest.mark.parametrize(
    "route,body,param",
    [
        ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),  # SamplingParams' logprobs
        ("chat", {"max_completion_tokens": 0}, "max_completion_tokens"),  # SamplingParams' max_tokens
        ("chat", {"max_tokens": 0}, "max_tokens"),
        ("chat", {"messages": [{"role": "user", "content": "x " * 600}]}, "messages"),  # the prompt: longer than the context
        ("chat", {"messages": []}, "messages"),
        ("completions", {"prompt": "x " * 600}, "prompt"),
        ("completions", {"max_tokens": 100_000}, "max_tokens"),  # a short prompt: max_tokens is what overflows
        ("completions", {"max_tokens": 0}, "max_tokens"),  # 0 only with echo (score the prompt)
        ("completions", {"prompt": []}, "prompt"),
        ("completions", {"prompt": [999_999]}, "prompt"),
        ("completions", {"stop_token_ids": [999_999]}, "stop_token_ids"),
        ("completions", {"logit_bias": {"999999": 5}}, "logit_bias"),
        ("completions", {"logit_bias": {"-5": 5}}, "logit_bias"),
        ("completions", {"frobnicate": 1}, "frobnicate"),  # the JSON's shape: pydantic's check
        ("completions", {"n": "two"}, "n"),
    ],
)
def test_request_errors_are_400s_whose_param_is_the_requests_field(server, route, body, param):
    base = {"completions": {"prompt": "x"}, "chat": {"messages": [{"role": "user", "content": "hi"}]}}[route]
    path = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}[route]
    r = httpx.post(server + path, json={"model": "tiny-r1", "max_tokens": 4, **base, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error


def test_the_openapi_document_shows_sampling_params_ranges(server):
    fields = httpx.get(server + "/openapi.json").json()["components"]["schemas"]["CompletionRequest"]["properties"]
    assert fields["temperature"]["minimum"] == 0 and fields["top_p"] == {**fields["top_p"], "exclusiveMinimum": 0, "maximum": 1}
    assert fields["logprobs"]["maximum"] == 20 and fields["max_tokens"]["minimum"] == 0


def test_openai_client_error_classes(client, server):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny-r1", prompt="x", temperature=-1)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")
    r = httpx.post(server + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    r = httpx.post(server + "/v1/completions", content=b"x" * (2 << 20), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_32_concurrent_streaming_clients_get_their_own_outputs(server, client):
    prompts = [f"def f{i}(x):" for i in range(32)]
    expected = [client.completions.create(model="tiny-r1", prompt=p, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}).choices[0].text for p in prompts[:4]]

    async def one(c, p):
        stream = await c.completions.create(model="tiny-r1", prompt=p, max_tokens=8, temperature=0, stream=True, extra_body={"ignore_eos": True})
        return "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])

    async def main():
        c = openai.AsyncOpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)
        return await asyncio.gather(*(one(c, p) for p in prompts))

    got = asyncio.run(main())
    assert got[:4] == expected and all(len(t) > 0 for t in got)


def test_disconnect_aborts_and_metrics_report_it(server):
    with httpx.stream("POST", server + "/v1/completions", json={"model": "tiny-r1", "prompt": "x", "max_tokens": 400, "stream": True, "ignore_eos": True}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 3:
                break
    deadline = time.time() + 20
    while time.time() < deadline:
        text = httpx.get(server + "/metrics").text
        if 'finished_reason="abort"' in text:
            break
        time.sleep(0.2)
    assert 'r1kit_request_success_total{finished_reason="abort",model_name="tiny-r1"} 1.0' in text
    assert 'r1kit_num_requests_running{model_name="tiny-r1"} 0.0' in text
    assert 'r1kit_kv_cache_usage_perc{model_name="tiny-r1"} 0.0' in text  # its blocks were freed
    for name in ("r1kit_time_to_first_token_seconds", "r1kit_e2e_request_latency_seconds", "r1kit_kv_cache_usage_perc", "r1kit_prefix_cache_hits_total"):
        assert name in text


def test_api_key_and_graceful_shutdown(model_dir):
    proc, base = start_server(model_dir, "--api-key", "s3cret")
    try:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).models.list()
        ok = openai.OpenAI(base_url=base + "/v1", api_key="s3cret", max_retries=0)
        assert ok.models.list().data[0].id == "tiny-r1"
        assert httpx.get(base + "/health").status_code == 200  # probes need no key
        if sys.platform.startswith("linux"):  # the HTTP thread is named for top -H and profilers
            names = {(task / "comm").read_text().strip() for task in Path(f"/proc/{proc.pid}/task").iterdir()}
            assert "r1kit-http" in names
        # SIGTERM while a request streams: the server stops accepting but lets it finish
        body = {"model": "tiny-r1", "prompt": "x", "max_tokens": 40, "stream": True, "ignore_eos": True}
        finish = []
        with httpx.stream("POST", base + "/v1/completions", json=body, headers={"Authorization": "Bearer s3cret"}, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    if not finish:
                        proc.terminate()
                    finish.append(json.loads(line[6:])["choices"][0]["finish_reason"])
        assert finish[-1] == "length"
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) in (0, -15)  # uvicorn re-raises the signal it handled


def test_math_sanity_of_usage(client):
    r = client.completions.create(model="tiny-r1", prompt=["a", "bb"], max_tokens=3, temperature=0, extra_body={"ignore_eos": True})
    assert len(r.choices) == 2 and r.usage.completion_tokens == 6 and math.isclose(r.usage.total_tokens, r.usage.prompt_tokens + 6)


@pytest.fixture(scope="module")
def api_schema(model_dir):
    """A server with a 48-token context, so that fuzzed requests stay cheap whatever they ask for."""
    import schemathesis

    proc, base = start_server(model_dir, "--max-model-len", "48")
    yield schemathesis.openapi.from_url(base + "/openapi.json")
    proc.terminate()
    proc.wait(timeout=30)


def _fuzz_schema():
    import schemathesis

    return schemathesis.pytest.from_fixture("api_schema")


@_fuzz_schema().parametrize()
@__import__("hypothesis").settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=list(__import__("hypothesis").HealthCheck))
def test_fuzzed_requests_never_get_a_5xx(case):
    response = case.call(timeout=60)
    assert response.status_code < 500, (case.path, case.body, response.text[:300])


def test_engine_loop_survives_a_failing_step(model_dir):
    """A step that raises fails the requests in it; the loop keeps serving the next ones."""
    from r1kit.infer.engine import EngineConfig, LLMEngine
    from r1kit.infer.sampling import SamplingParams
    from r1kit.serve.async_engine import AsyncEngine

    engine = LLMEngine(load_model(model_dir), load_tokenizer(model_dir), EngineConfig(kv_cache_memory=8 << 20))
    real_step, calls = engine.step, []

    def flaky_step():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected")
        return real_step()

    engine.step = flaky_step
    loop = AsyncEngine(engine)
    loop.start()

    async def run(prompt):
        return [out async for out in await loop.submit(prompt, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))]

    try:
        with pytest.raises(RuntimeError, match="injected"):
            asyncio.run(run("first"))
        outs = asyncio.run(run("second"))
        assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 3 and loop.alive
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    finally:
        loop.stop()


def test_a_consumer_that_falls_behind_gets_coalesced_outputs(model_dir):
    """Outputs queued while the consumer was busy arrive as one, with every step's deltas in order;
    a non-streaming request gets only its final output."""
    from r1kit.infer.engine import EngineConfig, LLMEngine
    from r1kit.infer.sampling import SamplingParams
    from r1kit.serve.async_engine import AsyncEngine

    engine = LLMEngine(load_model(model_dir), load_tokenizer(model_dir), EngineConfig(kv_cache_memory=8 << 20))
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    want = engine.step  # the same request run step by step, one output per step
    engine.add_request("ref", "def main():", params)
    steps = []
    while engine.has_unfinished_requests():
        steps += want()
    loop = AsyncEngine(engine)
    loop.start()

    async def slow_reader():
        outs = []
        async for out in await loop.submit("def main():", params):
            outs.append(out)
            await asyncio.sleep(0.05)  # the engine runs ahead meanwhile
        return outs

    async def whole():
        return [out async for out in await loop.submit("def main():", params, stream=False)]

    try:
        outs = asyncio.run(slow_reader())
        only = asyncio.run(whole())
    finally:
        loop.stop()
    # a non-streaming request is handed its final output alone
    assert len(only) == 1 and only[0].finished and only[0].outputs[0].token_ids == steps[-1].outputs[0].token_ids
    assert len(outs) < len(steps)  # fewer, larger chunks...
    final = outs[-1].outputs[0]
    assert outs[-1].finished and final.token_ids == steps[-1].outputs[0].token_ids
    # ...whose deltas still add up to the whole output, in order
    assert [t for out in outs for t in out.outputs[0].delta_token_ids] == final.token_ids
    assert "".join(out.outputs[0].delta_text for out in outs) == final.text == steps[-1].outputs[0].text


def test_stream_interval_sends_the_first_token_then_chunks_of_n(model_dir, monkeypatch):
    """--stream-interval 4: the engine thread sends the first token at once, then chunks of at least 4
    tokens, the end at once; the deltas the reader gets still add up to the whole output."""
    from r1kit.errors import ConfigError
    from r1kit.infer.engine import EngineConfig, LLMEngine
    from r1kit.infer.sampling import SamplingParams
    from r1kit.serve import async_engine
    from r1kit.serve.async_engine import AsyncEngine

    with pytest.raises(ConfigError, match="stream_interval=0"):
        AsyncEngine(None, stream_interval=0)
    # what the engine thread hands the event loop (a reader that falls behind merges chunks further,
    # see the test above, so the chunking is checked where it is decided)
    sent, put_all = [], async_engine._put_all
    monkeypatch.setattr(async_engine, "_put_all", lambda items: (sent.extend(len(out.outputs[0].delta_token_ids) for _, out in items), put_all(items)))
    engine = LLMEngine(load_model(model_dir), load_tokenizer(model_dir), EngineConfig(kv_cache_memory=8 << 20))
    loop = AsyncEngine(engine, stream_interval=4)
    loop.start()

    async def read():
        return [out async for out in await loop.submit("def main():", SamplingParams(temperature=0, max_tokens=14, ignore_eos=True))]

    try:
        outs = asyncio.run(read())
    finally:
        loop.stop()
    assert sent[0] == 1 and all(n >= 4 for n in sent[1:-1]) and sum(sent) == 14
    assert len(sent) <= 1 + -(-13 // 4)  # 14 tokens: 1 + 4 + 4 + 4 + 1
    assert sum(len(out.outputs[0].delta_token_ids) for out in outs) == 14 and outs[-1].finished and len(outs) <= len(sent)
    final = outs[-1].outputs[0]
    assert [t for out in outs for t in out.outputs[0].delta_token_ids] == final.token_ids
    assert "".join(out.outputs[0].delta_text for out in outs) == final.text and not loop._held


def test_a_port_in_use_is_a_clear_error(model_dir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "r1kit.cli", "serve", "--model", str(model_dir), "--port", str(port), "--kv-cache-memory", str(8 << 20)],
            capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
    assert proc.returncode == 2
    assert f"could not listen on 127.0.0.1:{port}" in proc.stderr and "--port" in proc.stderr
