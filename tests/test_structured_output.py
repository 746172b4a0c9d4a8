"""Structured output: specs checked when built, masks that allow exactly what the grammar allows,
engine outputs that parse and match their schema (checked by ``jsonschema``, an independent
validator), unconstrained neighbours untouched, and ``response_format`` over HTTP with the official
``openai`` client against the app in-process."""

import asyncio
import json
import re
import socket
import subprocess
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from r1kit.chat_template import DEFAULT_TEMPLATE, ChatTemplate
from r1kit.config import ModelConfig
from r1kit.errors import ConfigError
from r1kit.infer.engine import EngineConfig, LLMEngine
from r1kit.infer.sampling import SamplingParams, StructuredOutputs
from r1kit.infer.structured import Grammars, mask_disallowed
from r1kit.model import R1kitForCausalLM
from r1kit.serve.app import ServerState, build_app
from r1kit.serve.async_engine import AsyncEngine
from r1kit.tokenizer import EOS, train_tokenizer

NAME = {"type": "string", "maxLength": 8}
SCHEMAS = {
    "required fields": {"type": "object", "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
                        "required": ["name", "age"]},
    "enum": {"type": "object", "properties": {"tier": {"enum": ["gold", "silver", "bronze"]}, "ok": {"type": "boolean"}}, "required": ["tier", "ok"]},
    "numbers": {"type": "object", "properties": {"score": {"type": "number", "minimum": -1, "maximum": 1},
                                                 "n": {"type": "integer", "minimum": 3, "maximum": 9}}, "required": ["score", "n"]},
    "array": {"type": "object", "properties": {"tags": {"type": "array", "items": NAME, "minItems": 1, "maxItems": 3}}, "required": ["tags"]},
    "nested": {"type": "object", "properties": {"who": {"type": "object", "properties": {"name": NAME, "vip": {"type": "boolean"}},
                                                        "required": ["name", "vip"]}, "null": {"type": "null"}}, "required": ["who", "null"]},
}  # fmt: skip


def _model(vocab_size: int, eos: int) -> R1kitForCausalLM:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab_size, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=48,
                      local_window=4, max_seq_len=768, eos_token_id=eos)  # fmt: skip
    return R1kitForCausalLM(cfg)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([Path(m.__file__).read_text() for m in (json, socket, subprocess)], vocab_size=400)


@pytest.fixture(scope="module")
def model(tok):
    return _model(tok.get_vocab_size(), tok.token_to_id(EOS))


@pytest.fixture(scope="module")
def engine(model, tok):
    return LLMEngine(model, tok, EngineConfig(num_kv_blocks=512))


def run(engine, requests: list[tuple[str, SamplingParams]], abort: str | None = None) -> dict[str, list]:
    """Each request's completions (CompletionOutput), in order; ``abort``: dropped after one step."""
    ids = [engine.add_request(None, prompt, params) for prompt, params in requests]
    done: dict[str, list] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs
                engine.requests.pop(out.request_id, None)
        if abort is not None:
            engine.abort(ids[int(abort)])
            abort = None
    return {i: done[i] for i in ids if i in done}


def constrained(spec: StructuredOutputs, temperature: float = 0.0, seed: int = 0, max_tokens: int = 400, **kw) -> SamplingParams:
    return SamplingParams(temperature=temperature, seed=seed, max_tokens=max_tokens, structured=spec, **kw)


# -- the spec --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,words",
    [
        ({}, "exactly one"),
        ({"json": {"type": "object"}, "regex": "a"}, "exactly one"),
        ({"choice": []}, "non-empty"),
        ({"choice": ["a", ""]}, "non-empty"),
        ({"regex": "(ab"}, "regex is not valid"),
        ({"grammar": "root ::= missing"}, "not defined"),
        ({"grammar": "start: ("}, "grammar is not valid"),
        ({"json": "{not json"}, "not valid JSON"),
        ({"json": [1, 2]}, "JSON schema"),
        ({"json": {"type": "nope"}}, "nope"),
        ({"json": {"type": "array", "items": {"type": "integer", "multipleOf": 3}}}, "json.items: the JSON schema keyword 'multipleOf'"),
        ({"json": {"type": "string", "format": "color"}}, "format 'color'"),
        ({"json": {"type": "string", "pattern": "a+", "maxLength": 3}}, "put the length in the pattern"),
    ],
)
def test_a_bad_spec_is_refused_when_built(kwargs, words):
    with pytest.raises(ConfigError, match=re.escape(words)) as err:
        StructuredOutputs(**kwargs)
    assert err.value.param == "structured"


def test_sampling_params_check_the_structured_field():
    with pytest.raises(ConfigError) as err:
        SamplingParams(structured={"json": {}})
    assert err.value.param == "structured"
    with pytest.raises(ConfigError) as err:
        SamplingParams(min_tokens=2, structured=StructuredOutputs(json_object=True))
    assert err.value.param == "min_tokens"


def test_an_engine_without_a_tokenizer_refuses_a_grammar(model):
    engine = LLMEngine(model, None, EngineConfig(num_kv_blocks=8))
    with pytest.raises(ConfigError, match="needs a tokenizer") as err:
        engine.add_request(None, [3, 4], SamplingParams(structured=StructuredOutputs(choice=("a",))))
    assert err.value.param == "structured"


def test_equal_specs_share_one_compiled_grammar(tok):
    schema = SCHEMAS["nested"]
    as_dict, as_text = StructuredOutputs(json=schema), StructuredOutputs(json=json.dumps(schema, indent=2))
    assert as_dict.key == as_text.key and hash(as_dict) == hash(as_text) and as_dict == StructuredOutputs(json=dict(schema))
    grammars = Grammars(tok, tok.get_vocab_size())
    assert grammars.compile(as_dict) is grammars.compile(as_text) and grammars.compiles == 1
    grammars.compile(StructuredOutputs(choice=("a", "b")))
    assert grammars.compiles == 2


# -- the mask against references written from the spec ------------------------------------------------
def _allowed(grammars: Grammars, spec: StructuredOutputs, prefix: list[int]) -> set[int]:
    (state,) = grammars.states(spec, [], 1)
    for t in prefix:
        state.accept(t)
    logits = torch.zeros(1, grammars.vocab_size)
    mask_disallowed(logits, [0], [state])
    return set(torch.isfinite(logits[0]).nonzero().flatten().tolist())


def test_a_choice_allows_exactly_the_tokens_that_start_a_choice(tok):
    choices = ("import", "in", "None")
    texts = {i: tok.decode([i]) for i in range(tok.get_vocab_size())}
    expected = {i for i, text in texts.items() if text and any(c.startswith(text) for c in choices) and i not in _special(tok)}
    assert _allowed(Grammars(tok, tok.get_vocab_size()), StructuredOutputs(choice=choices), []) == expected


def _special(tok) -> set[int]:
    return {i for i, t in tok.get_added_tokens_decoder().items() if t.special}


def test_strings_never_take_a_raw_control_character_or_a_special_token(tok):
    """JSON forbids U+0000-U+001F inside a string (xgrammar's length-bounded strings let them
    through; r1kit's adapter closes that), and a special token's text is no JSON text."""
    grammars = Grammars(tok, tok.get_vocab_size())
    for schema in ({"type": "string", "maxLength": 5}, {"type": "string"}):
        allowed = _allowed(grammars, StructuredOutputs(json=schema), tok.encode('"', add_special_tokens=False).ids)
        assert allowed and not allowed & _special(tok)
        bad = [i for i in allowed if any(ord(c) < 0x20 for c in tok.decode([i]))]
        assert bad == [], [tok.decode([i]) for i in bad]


@st.composite
def schemas(draw, depth: int = 0):
    leaves = [
        st.just({"type": "boolean"}),
        st.just({"type": "null"}),
        st.integers(0, 3).map(lambda n: {"type": "string", "maxLength": n}),
        st.tuples(st.integers(-50, 50), st.integers(0, 50)).map(lambda ab: {"type": "integer", "minimum": ab[0], "maximum": ab[0] + ab[1]}),
        st.lists(st.sampled_from(["a", "b c", "é", 'q"'] ), min_size=1, max_size=3, unique=True).map(lambda e: {"enum": e}),
    ]  # fmt: skip
    if depth < 2:
        leaves.append(st.builds(lambda items, hi: {"type": "array", "items": items, "maxItems": hi}, schemas(depth + 1), st.integers(0, 2)))
        leaves.append(schemas(depth + 1))
    if depth > 0:
        return draw(st.one_of(leaves))
    props = draw(st.dictionaries(st.sampled_from(["id", "name", "x y", "ü"]), st.one_of(leaves), min_size=1, max_size=3))
    required = draw(st.lists(st.sampled_from(sorted(props)), unique=True))
    return {"type": "object", "properties": props, "required": required}


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(schema=schemas(), seed=st.integers(0, 2**16))
def test_a_random_walk_through_the_mask_always_ends_in_a_valid_document(tok, schema, seed):
    """Any token the mask allows keeps the output on a path to a document that matches the schema:
    draw uniformly among the allowed tokens until only the end is left."""
    grammars = _grammars(tok)
    (state,) = grammars.states(StructuredOutputs(json=schema), [tok.token_to_id(EOS)], 1)
    gen, ids = torch.Generator().manual_seed(seed), []
    for _ in range(600):
        logits = torch.zeros(1, grammars.vocab_size)
        mask_disallowed(logits, [0], [state])
        token = int(torch.multinomial(torch.isfinite(logits[0]).float(), 1, generator=gen))
        state.accept(token)
        if state.terminated:
            break
        ids.append(token)
    assert state.terminated and token == tok.token_to_id(EOS)
    jsonschema.validate(json.loads(tok.decode(ids)), schema)


_GRAMMARS: dict[int, Grammars] = {}


def _grammars(tok) -> Grammars:
    # hypothesis calls the test many times with one fixture value: compile its grammars once
    return _GRAMMARS.setdefault(id(tok), Grammars(tok, tok.get_vocab_size()))


# -- the engine ------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [0.0, 0.8, 1.5])
def test_every_constrained_output_parses_and_matches_its_schema(engine, temperature):
    names = list(SCHEMAS)
    outs = run(engine, [("import os", constrained(StructuredOutputs(json=SCHEMAS[n]), temperature, seed=i)) for i, n in enumerate(names)])
    for name, (completion,) in zip(names, outs.values()):
        assert completion.finish_reason == "stop", (name, completion.text)
        jsonschema.validate(json.loads(completion.text), SCHEMAS[name])


def test_json_object_regex_choice_and_grammar(engine):
    email = r"[a-z]{2,6}@[a-z]{2,4}\.(com|org)"
    specs = [StructuredOutputs(json_object=True), StructuredOutputs(regex=email), StructuredOutputs(choice=("yes", "no", "not sure")),
             StructuredOutputs(grammar='root ::= "(" [0-9] (" + " [0-9])* ")"'), StructuredOutputs(grammar='start: "x" | "y" "z"')]  # fmt: skip
    outs = list(run(engine, [("def f", constrained(s, 0.7, seed=3)) for s in specs]).values())
    texts = [o.text for (o,) in outs]
    assert all(o.finish_reason == "stop" for (o,) in outs), texts
    assert isinstance(json.loads(texts[0]), dict)
    assert re.fullmatch(email, texts[1]) and texts[2] in ("yes", "no", "not sure")
    assert re.fullmatch(r"\([0-9]( \+ [0-9])*\)", texts[3]) and texts[4] in ("x", "yz")


def test_unconstrained_neighbours_get_exactly_the_tokens_they_get_alone(engine):
    free = [("import os", SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)),
            ("def main", SamplingParams(temperature=0.9, seed=7, max_tokens=24, ignore_eos=True))]  # fmt: skip
    alone = [c[0].token_ids for c in run(engine, free).values()]
    mixed = [free[0], ("x = 1", constrained(StructuredOutputs(json=SCHEMAS["enum"]), 1.0, seed=1)), free[1],
             ("while", constrained(StructuredOutputs(json=SCHEMAS["array"]))), ("aborted", constrained(StructuredOutputs(json_object=True)))]  # fmt: skip
    outs = run(engine, mixed, abort="4")
    together = [outs[k][0].token_ids for k in list(outs)[:3:2]]
    assert together == alone
    guided = outs[list(outs)[1]][0]
    jsonschema.validate(json.loads(guided.text), SCHEMAS["enum"])
    assert len(outs) == 4  # the aborted one never finished


def test_logprobs_stay_those_of_the_raw_distribution(engine):
    free, guided = (SamplingParams(temperature=0, max_tokens=1, logprobs=3, structured=spec) for spec in (None, StructuredOutputs(choice=("{",))))
    (a,), (b,) = run(engine, [("def", free), ("def", guided)]).values()
    assert b.text == "{"
    top = lambda c: {t: round(lp.logprob, 5) for t, lp in c.logprobs[0].items() if lp.rank <= 3}
    assert top(a) == top(b)  # the same prompt: the same raw alternatives, whatever the mask allowed


def test_n_completions_each_follow_their_own_grammar_state(engine):
    (outs,) = run(engine, [("if x", constrained(StructuredOutputs(json=SCHEMAS["required fields"]), 1.0, seed=5, n=3))]).values()
    docs = [json.loads(c.text) for c in outs]
    for doc in docs:
        jsonschema.validate(doc, SCHEMAS["required fields"])
    assert len({c.text for c in outs}) > 1  # differently seeded: different documents


def test_preempted_and_recomputed_sequences_keep_their_grammar(model, tok):
    requests = [(f"print({i})", constrained(StructuredOutputs(json=SCHEMAS["nested"]), 0.8, seed=i, max_tokens=240)) for i in range(4)]
    roomy = [c[0].text for c in run(LLMEngine(model, tok, EngineConfig(num_kv_blocks=512)), requests).values()]
    tight = LLMEngine(model, tok, EngineConfig(num_kv_blocks=18))  # one request at full length fits; four do not
    texts = [c[0].text for c in run(tight, requests).values()]
    assert tight.scheduler.num_preemptions > 0 and texts == roomy
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMAS["nested"])


def test_the_real_smollm2_vocabulary(smollm2_dir):
    """SmolLM2's 49152-token byte-level vocabulary, with a tiny random model over it: valid documents,
    and never one of its special (chat) tokens."""
    from r1kit.tokenizer import load_tokenizer

    tok = load_tokenizer(smollm2_dir)
    eos = tok.token_to_id("<|im_end|>")
    engine = LLMEngine(_model(tok.get_vocab_size(), eos), tok, EngineConfig(num_kv_blocks=128))
    schema = SCHEMAS["required fields"]
    outs = run(engine, [("Extract the customer", constrained(StructuredOutputs(json=schema), 0.8, seed=s, n=2)) for s in range(2)])
    special = _special(tok) - {eos}
    for completion in (c for cs in outs.values() for c in cs):
        assert completion.finish_reason == "stop" and not set(completion.token_ids) & special
        jsonschema.validate(json.loads(completion.text), schema)


# -- HTTP ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def app(model, tok):
    loop = AsyncEngine(LLMEngine(model, tok, EngineConfig(num_kv_blocks=256)))
    loop.start()
    # r1kit's default template opens <think>: the grammar holds for the answer after </think>
    yield build_app(ServerState(model_name="tiny", tokenizer=tok, template=ChatTemplate(DEFAULT_TEMPLATE), engine=loop))
    loop.stop()


def _client(app) -> openai.AsyncOpenAI:
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
    return openai.AsyncOpenAI(base_url="http://t/v1", api_key="unused", max_retries=0, http_client=http)


def test_response_format_over_http_on_both_endpoints(app):
    schema = SCHEMAS["nested"]

    async def main():
        client = _client(app)
        chat = await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "who?"}], max_tokens=300, temperature=0.8, seed=2,
            response_format={"type": "json_schema", "json_schema": {"name": "who", "schema": schema, "strict": True}},
            extra_body={"thinking_budget": 3},
        )  # fmt: skip
        completion = await client.completions.create(model="tiny", prompt="import", max_tokens=300, temperature=0, extra_body={"response_format": {"type": "json_object"}})
        choice = await client.completions.create(model="tiny", prompt="import", max_tokens=20, n=2, temperature=1, seed=1,
                                                 extra_body={"structured_outputs": {"choice": ["red", "green"]}})  # fmt: skip
        text = await client.completions.create(model="tiny", prompt="import", max_tokens=5, temperature=0, extra_body={"response_format": {"type": "text"}})
        return chat, completion, choice, text

    chat, completion, choice, text = asyncio.run(main())
    message = chat.choices[0].message
    assert chat.choices[0].finish_reason == "stop" and message.reasoning_content is not None
    jsonschema.validate(json.loads(message.content), schema)
    assert isinstance(json.loads(completion.choices[0].text), dict)
    assert [c.text in ("red", "green") for c in choice.choices] == [True, True]
    assert text.choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    "body,param",
    [
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}}, "response_format"),
        ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "structured_outputs"),
        ({"structured_outputs": {"regex": "(a"}}, "structured_outputs"),
        ({"structured_outputs": {}}, "structured_outputs"),
    ],
)
def test_a_bad_response_format_is_a_400_naming_it(app, body, param):
    async def post(path, payload):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.post(path, json=payload)

    for path, payload in (("/v1/completions", {"prompt": "x"}), ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})):
        r = asyncio.run(post(path, {**payload, **body}))
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (path, r.json())
