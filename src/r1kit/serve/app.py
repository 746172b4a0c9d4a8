"""The HTTP API: OpenAI's completions and chat completions, tokenize/detokenize, health and metrics.

Responses, streaming chunks (``data: {...}`` … ``data: [DONE]``), ``usage`` and errors
(``{"error": {"message", "type", "param", "code"}}``) have OpenAI's shapes, so the ecosystem's
clients work unchanged. Bad input is a 400 that names the field, never a 500. This module only
translates between HTTP and the engine; it never samples or schedules.

Prompts are encoded as vLLM encodes them: a completion's text with the tokenizer's special tokens (a
Llama tokenizer's BOS), a rendered chat prompt without (its template wrote the BOS). A request leaves
a sampling field out: the checkpoint's ``generation_config.json`` value applies (``r1kit.generation_config``).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from r1kit.errors import R1kitError
from r1kit.fim import FimError, FimStyle, describe_styles
from r1kit.infer.outputs import RequestOutput
from r1kit.serve.async_engine import AsyncEngine, EngineUnavailable, QueueFull
from r1kit.serve.chat_template import ChatTemplate
from r1kit.serve.metrics import ServerMetrics
from r1kit.serve.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest, template_messages
from r1kit.serve.reasoning import ReasoningStream, split_reasoning


@dataclass
class ServerState:
    """What the handlers share. ``engine`` is None while the model loads (``/health`` answers 503)."""

    model_name: str
    tokenizer: Any = None
    template: ChatTemplate | None = None
    engine: AsyncEngine | None = None
    metrics: ServerMetrics | None = None
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    reasoning: bool = True  # the reasoning parser is on (it still leaves alone a model that never reasons)
    sampling_defaults: dict[str, Any] = field(default_factory=dict)  # SamplingParams fields from generation_config.json
    extra_eos: tuple[int, ...] = ()  # generation_config.json's end-of-sequence ids the model's own lack
    fim: FimStyle | None = None  # the tokenizer's fill-in-the-middle markers, if it has them
    created: int = field(default_factory=lambda: int(time.time()))


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_response(status: int, message: str, type_: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}}, status_code=status)


class _Guard:
    """The API key and the body-size limit, as plain ASGI middleware: a refused request gets its
    OpenAI-shaped error before any handler runs, and an accepted one passes through untouched
    (Starlette's ``BaseHTTPMiddleware`` would relay every streamed chunk through an extra task)."""

    def __init__(self, app, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        refusal = self._refusal(scope) if scope["type"] == "http" else None
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _refusal(self, scope) -> JSONResponse | None:
        headers = dict(scope["headers"])
        key = self.state.api_key
        given = headers.get(b"authorization", b"")
        if key and scope["path"] not in ("/health", "/metrics") and not hmac.compare_digest(given, f"Bearer {key}".encode()):
            return error_response(401, "invalid or missing API key: send 'Authorization: Bearer <key>'", "authentication_error", code="invalid_api_key")
        length = headers.get(b"content-length", b"").decode("latin-1")
        if length.isdigit() and int(length) > self.state.max_body_bytes:
            return error_response(413, f"request body of {length} bytes is over the limit of {self.state.max_body_bytes}", "invalid_request_error")
        return None


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="r1kit", version="1", docs_url=None, redoc_url=None)
    app.state.r1kit = state

    @app.exception_handler(APIError)
    async def _api_error(_, exc: APIError):
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(R1kitError)
    async def _r1kit_error(_, exc: R1kitError):
        return error_response(400, str(exc), "invalid_request_error", _param_of(str(exc)))

    @app.exception_handler(RequestValidationError)
    async def _validation(_, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        return error_response(400, message, "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), kind)

    app.add_middleware(_Guard, state=state)

    @app.get("/health")
    async def health():
        if state.engine is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        if not state.engine.alive:
            return JSONResponse({"status": "engine stopped", "error": repr(state.engine.error)}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        body = state.metrics.render() if state.metrics else b""
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.created, "owned_by": "r1kit"}]}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        _check_model(state, body.model)
        engine = _engine(state)  # 503 while loading: the tokenizer arrives with the engine
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", param="prompt")
        text = body.prompt if body.prompt is not None else _render(state, template_messages(body.messages))
        special = body.add_special_tokens if body.add_special_tokens is not None else body.prompt is not None
        ids = state.tokenizer.encode(text, add_special_tokens=special).ids
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.engine.max_model_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        _check_model(state, body.model)
        _engine(state)
        vocab = state.tokenizer.get_vocab_size()
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})", param="tokens")
        return {"prompt": state.tokenizer.decode(body.tokens, skip_special_tokens=False)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        _check_model(state, body.model)
        return await _completions(state, body)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest):
        _check_model(state, body.model)
        _engine(state)
        return await _chat(state, body)

    return app


# -- helpers -------------------------------------------------------------------------------------
def _engine(state: ServerState) -> AsyncEngine:
    if state.engine is None:
        raise APIError(503, "the model is still loading; retry when /health answers 200", "service_unavailable")
    return state.engine


def _check_model(state: ServerState, model: str | None) -> None:
    if model is not None and model != state.model_name:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {state.model_name!r}", "not_found_error", "model", "model_not_found")


def _render(state: ServerState, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    try:
        return state.template.render(messages, add_generation_prompt=add_generation_prompt)
    except R1kitError as exc:  # the template's own raise_exception
        raise APIError(400, f"messages: {exc}", param="messages") from None


def _usage(prompt_tokens: int, completion_tokens: int, cached: int = 0) -> dict[str, Any]:
    usage: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}
    if cached:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    return usage


async def _submit(state: ServerState, prompts: list, params, stream: bool) -> list[AsyncIterator[RequestOutput]]:
    """Hand every prompt to the engine together (they prefill in the same steps) and wait until all
    are accepted, so validation errors become 400s; if one is refused, the others are aborted."""
    engine = _engine(state)
    params = params.with_eos_ids(state.extra_eos)
    results = await asyncio.gather(*(engine.submit(p, params, stream=stream) for p in prompts), return_exceptions=True)
    failure = next((r for r in results if isinstance(r, BaseException)), None)
    if failure is None:
        return list(results)
    for r in results:
        if not isinstance(r, BaseException):
            await r.aclose()
    if isinstance(failure, (QueueFull, EngineUnavailable)):
        raise APIError(503, str(failure), "service_unavailable") from None
    if isinstance(failure, R1kitError):
        raise APIError(400, str(failure), param=_param_of(str(failure))) from None
    raise failure


PARAMS = ("max_tokens", "min_tokens", "prompt", "suffix", "temperature", "top_p", "top_k", "min_p", "stop_token_ids", "stop", "logprobs",
          "logit_bias", "seed", "repetition_penalty", "presence_penalty", "frequency_penalty", "thinking_budget", "messages", "n")  # fmt: skip


def _param_of(message: str) -> str | None:
    """The request field an engine error names (whole words; the one-letter "n" last)."""
    return next((name for name in PARAMS if re.search(rf"\b{name}\b", message)), None)


async def _final(stream: AsyncIterator[RequestOutput]) -> RequestOutput:
    last = None
    async for last in stream:
        pass
    return last


async def _merge(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several requests' outputs as they come, tagged with the request's position."""
    if len(streams) == 1:  # the common case: no tasks or queue between the engine and the client
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in stream:
                await queue.put((i, out))
        except Exception as exc:  # noqa: BLE001 (handed to the consumer, which re-raises it)
            await queue.put((i, exc))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, out = await queue.get()
            if out is None:
                remaining -= 1
            elif isinstance(out, Exception):
                raise out
            else:
                yield i, out
    finally:
        for task in tasks:
            task.cancel()


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


# -- logprobs in OpenAI's two shapes -----------------------------------------------------------------
def _token_text(state: ServerState, token_id: int, entry) -> str:
    return entry.decoded_token if entry is not None and entry.decoded_token is not None else state.tokenizer.decode([token_id], skip_special_tokens=False)


def _completion_logprobs(state: ServerState, ids: list[int], entries: list, offset: int = 0) -> dict[str, Any]:
    tokens, token_logprobs, top, offsets = [], [], [], []
    pos = offset
    for token_id, entry in zip(ids, entries):
        text = _token_text(state, token_id, entry.get(token_id) if entry else None)
        tokens.append(text)
        offsets.append(pos)
        pos += len(text)
        if entry is None:
            token_logprobs.append(None)
            top.append(None)
            continue
        token_logprobs.append(entry[token_id].logprob)
        top.append({_token_text(state, t, lp): lp.logprob for t, lp in entry.items()})
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def _chat_logprobs(state: ServerState, ids: list[int], entries: list, top_n: int) -> dict[str, Any]:
    content = []
    for token_id, entry in zip(ids, entries):
        text = _token_text(state, token_id, entry.get(token_id))
        alternatives = sorted(entry.items(), key=lambda kv: kv[1].rank)[:top_n]
        content.append(
            {
                "token": text,
                "logprob": entry[token_id].logprob,
                "bytes": list(text.encode("utf-8")),
                "top_logprobs": [
                    {"token": (t_text := _token_text(state, t, lp)), "logprob": lp.logprob, "bytes": list(t_text.encode("utf-8"))}
                    for t, lp in alternatives
                ],
            }
        )
    return {"content": content}


# -- /v1/completions -----------------------------------------------------------------------------
async def _completions(state: ServerState, body: CompletionRequest):
    echo_only = body.echo and body.max_tokens == 0  # lm-eval's loglikelihood: score the prompt only
    if body.max_tokens == 0 and not body.echo:
        raise APIError(400, "max_tokens must be >= 1 (0 is only meaningful with echo=true)", param="max_tokens")
    max_tokens = 1 if echo_only else (body.max_tokens or state.sampling_defaults.get("max_tokens", 16))
    prompt_logprobs = body.logprobs if body.echo and body.logprobs is not None else None
    params = body.sampling(max_tokens, body.logprobs, prompt_logprobs, state.sampling_defaults)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    prompts = body.prompts() if body.suffix is None else _fim_prompts(state, body)
    streams = await _submit(state, prompts, params, bool(body.stream))
    created = int(time.time())

    if body.stream:

        async def events():
            usage_prompt, usage_completion = 0, 0
            echoed: set[int] = set()
            offsets: dict[int, int] = {}  # text offset of each choice, for the logprobs' text_offset
            async for i, out in _merge(streams):
                for c in out.outputs:
                    index = i * body.n + c.index
                    text = "" if echo_only else c.delta_text
                    if body.echo and index not in echoed:
                        echoed.add(index)
                        text = (out.prompt or state.tokenizer.decode(out.prompt_token_ids, skip_special_tokens=False)) + text
                    if not text and c.finish_reason is None and not (body.logprobs is not None and c.delta_token_ids):
                        continue  # nothing new (a token that ends mid-character shows with the next one)
                    logprobs = None
                    if body.logprobs is not None and c.logprobs and c.delta_token_ids and not echo_only:
                        fresh = len(c.delta_token_ids)
                        logprobs = _completion_logprobs(state, c.delta_token_ids, c.logprobs[-fresh:], offsets.get(index, 0))
                    offsets[index] = offsets.get(index, 0) + len(text)
                    yield _sse(
                        {
                            "id": request_id, "object": "text_completion", "created": created, "model": state.model_name,
                            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": c.finish_reason}],
                        }
                    )  # fmt: skip
                if out.finished:
                    usage_prompt += len(out.prompt_token_ids)
                    usage_completion += sum(len(c.token_ids) for c in out.outputs)
            if body.stream_options and body.stream_options.include_usage:
                yield _sse({"id": request_id, "object": "text_completion", "created": created, "model": state.model_name, "choices": [], "usage": _usage(usage_prompt, usage_completion)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    finals = await asyncio.gather(*(_final(s) for s in streams))
    choices = []
    for i, out in enumerate(finals):
        prompt_text = out.prompt or state.tokenizer.decode(out.prompt_token_ids, skip_special_tokens=False)
        for c in out.outputs:
            text = "" if echo_only else c.text
            logprobs = None
            if body.logprobs is not None:
                ids = ([] if echo_only else list(c.token_ids))
                entries = [] if echo_only else list(c.logprobs or [])
                if body.echo:
                    ids, entries = list(out.prompt_token_ids) + ids, list(out.prompt_logprobs or [None] * len(out.prompt_token_ids)) + entries
                logprobs = _completion_logprobs(state, ids, entries)
            choices.append(
                {
                    "index": i * body.n + c.index,
                    "text": (prompt_text + text) if body.echo else text,
                    "logprobs": logprobs,
                    "finish_reason": "length" if echo_only else c.finish_reason,
                }
            )
    prompt_tokens = sum(len(o.prompt_token_ids) for o in finals)
    completion_tokens = 0 if echo_only else sum(len(c.token_ids) for o in finals for c in o.outputs)
    return {
        "id": request_id, "object": "text_completion", "created": created, "model": state.model_name, "choices": choices,
        "usage": _usage(prompt_tokens, completion_tokens, sum(o.num_cached_tokens for o in finals)),
    }  # fmt: skip


def _fim_prompts(state: ServerState, body: CompletionRequest) -> list[str]:
    """Fill-in-the-middle: each text prompt is the code before the hole, ``suffix`` the code after it."""
    if state.fim is None:
        raise APIError(400, f"suffix (fill-in-the-middle) needs a tokenizer with FIM tokens ({describe_styles()}); "
                            f"{state.model_name!r} has none: send the prompt without suffix", param="suffix")  # fmt: skip
    if body.echo:
        raise APIError(400, "suffix cannot be combined with echo: the prompt sent to the model is not the prompt given", param="suffix")
    prompts = body.prompts()
    if not all(isinstance(p, str) for p in prompts):
        raise APIError(400, "suffix needs text prompts (the FIM markers go between prefix and suffix), not token ids", param="suffix")
    try:
        return [state.fim.prompt(p, body.suffix) for p in prompts]
    except FimError as exc:
        raise APIError(400, str(exc), param=exc.field) from None


# -- /v1/chat/completions ----------------------------------------------------------------------------
async def _chat(state: ServerState, body: ChatCompletionRequest):
    engine = _engine(state).engine
    prompt = _render(state, template_messages(body.messages), body.add_generation_prompt)
    ids = state.tokenizer.encode(prompt, add_special_tokens=False).ids  # the template wrote any BOS
    max_tokens = body.max_completion_tokens or body.max_tokens
    if max_tokens is None:
        room = max(1, engine.max_model_len - len(ids))
        max_tokens = min(room, state.sampling_defaults.get("max_tokens", room))
    top_n = body.top_logprobs or 0
    params = body.sampling(max_tokens, top_n if body.logprobs else None, None, state.sampling_defaults)
    (stream,) = await _submit(state, [{"prompt": prompt, "prompt_token_ids": ids}], params, bool(body.stream))
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    # a model that never reasons (no </think> token) keeps its whole answer in content; one whose
    # prompt ends inside <think> (R1) starts in reasoning; any other starts in content
    reasoning = state.reasoning and engine.special.think_end is not None
    starts_in_reasoning = engine.processor.opens_reasoning(ids)

    def message_parts(text: str) -> dict[str, Any]:
        if not reasoning:
            return {"content": text}
        thought, answer = split_reasoning(text, starts_in_reasoning)
        return {"content": answer, "reasoning_content": thought, "reasoning": thought}

    if body.stream:

        async def events():
            parsers = [ReasoningStream(starts_in_reasoning) for _ in range(body.n)]
            started: set[int] = set()
            final: RequestOutput | None = None
            base = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": state.model_name}
            async for final in stream:
                for c in final.outputs:
                    if c.index not in started:
                        started.add(c.index)
                        yield _sse({**base, "choices": [{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]})
                    done = c.finish_reason is not None
                    if reasoning:
                        thought, answer = parsers[c.index].feed(c.delta_text, final=done)
                    else:
                        thought, answer = "", c.delta_text
                    delta: dict[str, Any] = {}
                    if thought:
                        delta["reasoning_content"] = delta["reasoning"] = thought
                    if answer:
                        delta["content"] = answer
                    logprobs = None
                    if body.logprobs and c.logprobs and c.delta_token_ids:
                        logprobs = _chat_logprobs(state, c.delta_token_ids, c.logprobs[-len(c.delta_token_ids) :], top_n)
                    if delta or done:
                        yield _sse({**base, "choices": [{"index": c.index, "delta": delta, "logprobs": logprobs, "finish_reason": c.finish_reason}]})
            if final is not None and body.stream_options and body.stream_options.include_usage:
                usage = _usage(len(final.prompt_token_ids), sum(len(c.token_ids) for c in final.outputs), final.num_cached_tokens)
                yield _sse({**base, "choices": [], "usage": usage})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    out = await _final(stream)
    choices = [
        {
            "index": c.index,
            "message": {"role": "assistant", **message_parts(c.text)},
            "logprobs": _chat_logprobs(state, c.token_ids, c.logprobs or [], top_n) if body.logprobs else None,
            "finish_reason": c.finish_reason,
        }
        for c in out.outputs
    ]
    return {
        "id": request_id, "object": "chat.completion", "created": created, "model": state.model_name, "choices": choices,
        "usage": _usage(len(out.prompt_token_ids), sum(len(c.token_ids) for c in out.outputs), out.num_cached_tokens),
    }  # fmt: skip
