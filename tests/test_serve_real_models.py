"""`r1kit serve` on checkpoints shaped like real ones (tests/chatml_models.py), through the `openai` client:
generation_config.json defaults, the reasoning parser only where the prompt opens <think>, fill-in-the-middle
and BOS handling."""

import httpx
import openai
import pytest
from chatml_models import chatml_think_dir, smol_dir
from test_serve import launch_server, wait_healthy

from r1kit.tokenizer import END_THINK, THINK, load_tokenizer
from r1kit.infer.generate import generate
from r1kit.infer.sampling import SamplingParams
from r1kit.checkpoints import load_model

GREEDY_5 = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)


def client_of(proc, model_dir):
    client = openai.OpenAI(base_url=proc.base + "/v1", api_key="unused", max_retries=0, timeout=60)
    client.base, client.name, client.model_dir = proc.base, model_dir.name, model_dir
    return client


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    return smol_dir(tmp_path_factory.mktemp("real") / "smol")


@pytest.fixture(scope="module")
def servers(smol, tmp_path_factory):
    """The SmolLM2-shaped model served with --generation-config auto and none, and a ChatML model that has <think> tokens."""
    think = chatml_think_dir(tmp_path_factory.mktemp("real") / "chatml-think")
    launched = {"auto": (smol,), "none": (smol, "--generation-config", "none"), "think": (think,)}
    started = {key: (launch_server(*args), args[0]) for key, args in launched.items()}
    try:
        yield {key: client_of(wait_healthy(proc), model_dir) for key, (proc, model_dir) in started.items()}
    finally:
        for proc, _ in started.values():
            proc.terminate()
            proc.wait(timeout=30)


def reference(model_dir, ids, params=GREEDY_5) -> str:
    tok = load_tokenizer(model_dir)
    return tok.decode(generate(load_model(model_dir), ids, params), skip_special_tokens=True)


def chat(client, stream=False, **kwargs):
    body = dict(model=client.name, messages=[{"role": "user", "content": "def add(a, b):"}], **kwargs)
    if not stream:
        message = client.chat.completions.create(**body).choices[0].message
        return (message.model_extra or {}).get("reasoning_content"), message.content
    chunks = [c for c in client.chat.completions.create(**body, stream=True) if c.choices]
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks)
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    return reasoning or None, content or None


# -- 1. generation_config.json -------------------------------------------------------------------------
def test_the_checkpoints_generation_config_sets_what_a_request_leaves_out(servers):
    client = servers["auto"]
    base = dict(model="smol", prompt="import os", extra_body={"ignore_eos": True})
    default = client.completions.create(**base)  # the file: temperature 0, max_new_tokens 5
    assert default.usage.completion_tokens == 5
    assert client.completions.create(**base).choices[0].text == default.choices[0].text  # greedy: the same every time
    assert client.completions.create(**base, temperature=0, max_tokens=5).choices[0].text == default.choices[0].text
    assert client.completions.create(**base, max_tokens=3).usage.completion_tokens == 3  # the request wins
    assert client.completions.create(**base, temperature=1.0, seed=3, max_tokens=5).choices[0].text != default.choices[0].text
    assert client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "hi"}], extra_body={"ignore_eos": True}).usage.completion_tokens == 5
    # with none, r1kit's (OpenAI's) defaults: 16 tokens
    assert servers["none"].completions.create(**base).usage.completion_tokens == 16


@pytest.mark.parametrize("mode", ["auto", "none"])
def test_generation_config_eos_ids_end_the_output_in_both_modes(servers, smol, mode):
    endoftext = load_tokenizer(smol).token_to_id("<|endoftext|>")  # config.json's EOS is <|im_end|>
    body = dict(model="smol", prompt="x", max_tokens=5, temperature=0, logit_bias={str(endoftext): 100})
    stopped = servers[mode].completions.create(**body)
    assert stopped.choices[0].finish_reason == "stop" and stopped.usage.completion_tokens == 1 and stopped.choices[0].text == ""
    kept = servers[mode].completions.create(**body, extra_body={"ignore_eos": True})
    assert kept.choices[0].finish_reason == "length" and kept.usage.completion_tokens == 5


# -- 2. the reasoning parser only where the prompt opens <think> ---------------------------------------
@pytest.mark.parametrize("stream", [False, True])
def test_a_model_without_think_tokens_answers_in_content(servers, smol, stream):
    client = servers["auto"]
    ids = httpx.post(client.base + "/tokenize", json={"messages": [{"role": "user", "content": "def add(a, b):"}]}).json()["tokens"]
    expected = reference(smol, ids)
    assert expected  # something visible to classify
    assert chat(client, stream, temperature=0, max_tokens=5, extra_body={"ignore_eos": True}) == (None, expected)


@pytest.mark.parametrize("stream", [False, True])
def test_a_template_that_never_opens_think_keeps_think_tokens_in_content(servers, stream):
    client = servers["think"]
    end = load_tokenizer(client.model_dir).token_to_id(END_THINK)
    # the model is pushed to write </think> every step: with an R1 prompt that would split; here it is all content
    assert chat(client, stream, temperature=0, max_tokens=3, logit_bias={str(end): 100}) == (None, END_THINK * 3)


@pytest.mark.parametrize("stream", [False, True])
def test_a_model_that_opens_think_itself_reasons(servers, stream):
    client = servers["think"]
    start = load_tokenizer(client.model_dir).token_to_id(THINK)
    # the output starts with <think>: reasoning from there (it never closes, so all of it)
    assert chat(client, stream, temperature=0, max_tokens=3, logit_bias={str(start): 100}) == (THINK * 2, None)


# -- 3. fill-in-the-middle -----------------------------------------------------------------------------
def test_suffix_builds_the_fim_prompt(servers, smol):
    tok = load_tokenizer(smol)
    r = servers["auto"].completions.create(model="smol", prompt="def add(a, b):\n    ", suffix="\n    return c\n", temperature=0, max_tokens=5,
                                           extra_body={"ignore_eos": True})  # fmt: skip
    fim = tok.encode("<fim_prefix>def add(a, b):\n    <fim_suffix>\n    return c\n<fim_middle>", add_special_tokens=True).ids
    assert fim[0] == tok.token_to_id("<s>") and r.usage.prompt_tokens == len(fim)
    assert r.choices[0].text == reference(smol, fim)


@pytest.mark.parametrize(
    "server,body,param,words",
    [
        ("think", {"prompt": "x", "suffix": "y"}, "suffix", "has none"),  # r1kit's tokenizer has no FIM tokens
        ("auto", {"prompt": "a <fim_middle> b", "suffix": "y"}, "prompt", "<fim_middle>"),
        ("auto", {"prompt": "x", "suffix": "y", "echo": True}, "suffix", "echo"),
        ("auto", {"prompt": [5, 6], "suffix": "y"}, "suffix", "token ids"),
    ],
)
def test_suffix_errors_are_400s_in_openais_shape(servers, server, body, param, words):
    client = servers[server]
    r = httpx.post(client.base + "/v1/completions", json={"model": client.name, "max_tokens": 2, **body})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and words in error["message"]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=client.name, max_tokens=2, **body)


# -- 4. BOS: completions follow the tokenizer's rule, chat does not double it ----------------------------
def test_completion_prompts_get_the_tokenizers_bos_and_chat_prompts_only_the_templates(servers, smol):
    client, tok = servers["auto"], load_tokenizer(smol)
    bos = tok.token_to_id("<s>")
    ids = tok.encode("import os", add_special_tokens=True).ids
    assert ids[0] == bos and ids[1:] == tok.encode("import os", add_special_tokens=False).ids
    r = client.completions.create(model="smol", prompt="import os", temperature=0, max_tokens=5, extra_body={"ignore_eos": True})
    assert r.usage.prompt_tokens == len(ids) and r.choices[0].text == reference(smol, ids)
    assert httpx.post(client.base + "/tokenize", json={"prompt": "import os"}).json()["tokens"] == ids
    # the template starts with {{ bos_token }}: one BOS, not two
    messages = [{"role": "user", "content": "hi"}]
    chat_ids = httpx.post(client.base + "/tokenize", json={"messages": messages}).json()["tokens"]
    assert chat_ids[0] == bos and chat_ids.count(bos) == 1
    assert client.chat.completions.create(model="smol", messages=messages, max_tokens=1).usage.prompt_tokens == len(chat_ids)
