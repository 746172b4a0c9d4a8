"""The HTTP API: OpenAI's completions and chat completions, tokenize/detokenize, health and metrics.

Responses, streaming chunks (``data: {...}`` … ``data: [DONE]``), ``usage`` and errors
(``{"error": {"message", "type", "param", "code"}}``) have OpenAI's shapes, so the ecosystem's
clients work unchanged. Bad input is a 400 that names the field, never a 500. This module only
translates between HTTP and the engine; it never samples or schedules.

Prompts are encoded as vLLM encodes them: a completion's text with the tokenizer's special tokens (a
Llama tokenizer's BOS), a rendered chat prompt without (its template wrote the BOS). A request leaves
a sampling field out: the checkpoint's ``generation_config.json`` value applies (``r1kit.generation_config``).

What one client may cost the others is bounded: a body is counted as it arrives and refused (413)
past ``max_body_bytes`` whatever its framing, or (408) when it takes over ``body_timeout``;
tokenizing, template rendering and long responses run on a bounded pool of threads, not the event
loop (``r1kit.serve.workers``); a client that leaves aborts its request, streamed or not; an
overloaded server answers 503 with ``Retry-After``. Header limits: ``r1kit.serve.connections``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from r1kit.errors import R1kitError
from r1kit.fim import FimStyle, describe_styles
from r1kit.infer.outputs import RequestOutput
from r1kit.serve.async_engine import AsyncEngine, EngineUnavailable, QueueFull, RequestStream
from r1kit.chat_template import ChatTemplate
from r1kit.serve.metrics import ServerMetrics
from r1kit.serve.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, ErrorResponse, TokenizeRequest, template_messages
from r1kit.serve.reasoning import ReasoningStream, split_reasoning
from r1kit.serve.workers import Workers, WorkersBusy, decode, encode

T = TypeVar("T")
RETRY_AFTER_S = 1  # a full queue drains by the request: worth retrying soon
UNAVAILABLE = (QueueFull, EngineUnavailable, WorkersBusy)  # the server's 503s
DONE = "data: [DONE]\n\n"


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
    body_timeout: float = 10.0  # seconds a request's body may take to arrive, once its headers have
    reasoning: bool = True  # the reasoning parser is on (it still leaves alone a model that never reasons)
    sampling_defaults: dict[str, Any] = field(default_factory=dict)  # SamplingParams fields from generation_config.json
    extra_eos: tuple[int, ...] = ()  # generation_config.json's end-of-sequence ids the model's own lack
    fim: FimStyle | None = None  # the tokenizer's fill-in-the-middle markers, if it has them
    workers: Workers = field(default_factory=Workers)
    created: int = field(default_factory=lambda: int(time.time()))


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_response(status: int, message: str, type_: str, param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    """OpenAI's error body; a 503 says when to retry (``Retry-After``, which the openai client honours)."""
    headers = {**({"Retry-After": str(RETRY_AFTER_S)} if status == 503 else {}), **(headers or {})}
    return JSONResponse({"error": _error(message, type_, param, code)}, status_code=status, headers=headers)


def _error(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    # a message or param may quote the request (a field name, a value) and so hold lone surrogates,
    # which UTF-8 cannot encode: they go out as escapes rather than failing the response
    printable = lambda text: text.encode("utf-8", "backslashreplace").decode("utf-8")  # noqa: E731
    return {"message": printable(message), "type": type_, "param": None if param is None else printable(param), "code": code}


class _Refused(Exception):
    """A request the guard answers itself; ``response`` None: the client left, nothing to answer."""

    def __init__(self, response: Response | None) -> None:
        self.response = response


class _Guard:
    """The API key, the body-size limit and the body deadline, as plain ASGI middleware: a refused
    request gets its OpenAI-shaped error before any handler runs, and an accepted one passes through
    untouched (Starlette's ``BaseHTTPMiddleware`` would relay every streamed chunk through an extra
    task). The body is read here, counted as it arrives, and handed on whole."""

    def __init__(self, app, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            self._check_headers(scope)
            body = await self._read_body(receive)
        except _Refused as refused:
            if refused.response is not None:
                await refused.response(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)

    def _check_headers(self, scope) -> None:
        headers = dict(scope["headers"])
        key = self.state.api_key
        given = headers.get(b"authorization", b"")
        if key and scope["path"] not in ("/health", "/metrics", "/support") and not hmac.compare_digest(given, f"Bearer {key}".encode()):
            raise _Refused(error_response(401, "invalid or missing API key: send 'Authorization: Bearer <key>'", "authentication_error", code="invalid_api_key"))
        length = headers.get(b"content-length", b"").decode("latin-1")
        if length.isdigit() and int(length) > self.state.max_body_bytes:
            raise _Refused(self._too_large(f"{length} bytes"))

    async def _read_body(self, receive) -> bytes:
        """The body, refused (413) as soon as the bytes received pass the limit, whatever the framing (a
        chunked upload declares no length), or (408) once it has taken ``body_timeout``; the rest of a
        refused body is never read (the connection closes)."""
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.state.body_timeout):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise _Refused(None)
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.state.max_body_bytes:
                        raise _Refused(self._too_large(f"over {size} bytes"))
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        return b"".join(chunks)
        except TimeoutError:
            message = f"the request body did not arrive within {self.state.body_timeout:g} s (--read-timeout); send it at once"
            raise _Refused(error_response(408, message, "invalid_request_error", headers={"Connection": "close"})) from None

    def _too_large(self, size: str) -> JSONResponse:
        message = f"the request body ({size}) is over the limit of {self.state.max_body_bytes} bytes (--max-body-bytes)"
        return error_response(413, message, "invalid_request_error", headers={"Connection": "close"})


def _replay(body: bytes, receive):
    """``receive`` for the app: the body the guard read, then the connection's own messages (its disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed():
        return pending.pop() if pending else await receive()

    return replayed


# the error statuses each route may answer, for the OpenAPI document
_ERROR_DESCRIPTIONS = {
    400: "invalid request: `param` names the field",
    401: "missing or wrong API key",
    404: "a model this server does not serve",
    408: "the request body took longer than the read timeout",
    413: "the request body is over the size limit",
    503: "the model is loading, or the server is at capacity: retry after `Retry-After` seconds",
}
_STREAMED = {200: {"content": {"text/event-stream": {}}, "description": "the response; with `stream`, server-sent events"}}
_GUARD_ERRORS = (408, 413)  # every route: the guard reads every body
_API_ERRORS = (*_GUARD_ERRORS, 400, 401, 404, 503)


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse, "description": _ERROR_DESCRIPTIONS[status]} for status in statuses}


def _document_400s(app: FastAPI) -> None:
    """FastAPI documents a 422 for every request body; r1kit answers 400 (OpenAI's status, with
    OpenAI's error shape), so the document says 400 and drops FastAPI's validation-error schemas."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            for operations in schema["paths"].values():
                for operation in operations.values():
                    operation["responses"].pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
        return app.openapi_schema

    app.openapi = openapi


def _param(error: dict[str, Any], body: Any) -> str | None:
    """The request field a pydantic error is about: its ``loc`` walked through the JSON body, so that
    the tags pydantic puts in it for union members (``prompt.ids.3``, ``content.function-after[…]``)
    drop out."""
    loc = tuple(error.get("loc", ()))
    loc = loc[1:] if loc[:1] == ("body",) else loc
    path, node = [], body
    for i, part in enumerate(loc):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and type(part) is int and 0 <= part < len(node):
            node = node[part]
        elif isinstance(node, dict) and i == len(loc) - 1 and error.get("type") == "missing":
            node = None
        else:
            continue  # a union member's tag
        path.append(str(part))
    return ".".join(path) or None


def _validation_message(errors: list[dict[str, Any]], body: Any) -> tuple[str, str | None]:
    """(message, param) of the most specific error: the one deepest in the body."""
    if not errors:
        return "invalid request", None
    named = [(_param(e, body), e) for e in errors]
    param, error = max(named, key=lambda pe: 0 if pe[0] is None else pe[0].count(".") + 1)  # the first of the deepest
    msg = str(error.get("msg"))
    if error.get("type") == "json_invalid":
        msg = f"the body is not valid JSON: {error.get('ctx', {}).get('error', msg)}"
    return (f"{param}: {msg}" if param else msg), param


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="r1kit", version="1", docs_url=None, redoc_url=None)
    app.state.r1kit = state

    @app.exception_handler(APIError)
    async def _api_error(_, exc: APIError):
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(R1kitError)
    async def _r1kit_error(_, exc: R1kitError):
        return error_response(400, str(exc), "invalid_request_error", exc.param)

    for unavailable in UNAVAILABLE:  # R1kitErrors too, but the server's fault, not the request's

        @app.exception_handler(unavailable)
        async def _unavailable(_, exc: R1kitError):
            return error_response(503, str(exc), "service_unavailable")

    @app.exception_handler(RequestValidationError)
    async def _validation(_, exc: RequestValidationError):
        message, param = _validation_message(list(exc.errors()), exc.body)
        return error_response(400, message, "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), kind)

    @app.exception_handler(Exception)
    async def _bug(_, exc: Exception):  # OpenAI's shape, not a plain-text 500; uvicorn still logs the traceback
        return error_response(500, f"the server failed on this request: {exc!r}", "server_error")

    app.add_middleware(_Guard, state=state)
    _document_400s(app)

    @app.get("/health", responses={503: {"description": "the model is loading, or the engine loop stopped"}, **_errors(*_GUARD_ERRORS)})
    async def health():
        if state.engine is None:
            return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})
        if not state.engine.alive:
            return JSONResponse({"status": "engine stopped", "error": repr(state.engine.error)}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics", responses={200: {"content": {"text/plain": {}}}, **_errors(*_GUARD_ERRORS)})
    async def metrics():
        body = state.metrics.render() if state.metrics else b""
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", responses=_errors(*_GUARD_ERRORS, 401))
    async def models():
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.created, "owned_by": "r1kit"}]}

    @app.post("/tokenize", responses=_errors(*_API_ERRORS))
    async def tokenize(body: TokenizeRequest):
        _check_model(state, body.model)
        engine = _engine(state)  # 503 while loading: the tokenizer arrives with the engine
        special = body.add_special_tokens if body.add_special_tokens is not None else body.prompt is not None
        ids = await state.workers.run(_tokenize, state, body, special)
        return await _json(state, lambda: {"tokens": ids, "count": len(ids), "max_model_len": engine.engine.max_model_len})

    @app.post("/detokenize", responses=_errors(*_API_ERRORS))
    async def detokenize(body: DetokenizeRequest):
        _check_model(state, body.model)
        _engine(state)
        vocab = state.tokenizer.get_vocab_size()
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})", param="tokens")
        return {"prompt": await state.workers.run(decode, state.tokenizer, body.tokens)}

    @app.post("/v1/completions", responses={**_STREAMED, **_errors(*_API_ERRORS)})
    async def completions(body: CompletionRequest, request: Request):
        _check_model(state, body.model)
        return await _completions(state, body, request)

    @app.post("/v1/chat/completions", responses={**_STREAMED, **_errors(*_API_ERRORS)})
    async def chat(body: ChatCompletionRequest, request: Request):
        _check_model(state, body.model)
        return await _chat(state, body, request)

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


def _tokenize(state: ServerState, body: TokenizeRequest, special: bool) -> list[int]:
    """/tokenize's ids (on a worker)."""
    text = body.prompt if body.prompt is not None else _render(state, template_messages(body.messages))
    return encode(state.tokenizer, [text], special)[0]


def _usage(prompt_tokens: int, completion_tokens: int, cached: int = 0) -> dict[str, Any]:
    usage: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}
    if cached:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    return usage


async def _submit(state: ServerState, prompts: list, params, stream: bool) -> list[RequestStream]:
    """Hand every prompt to the engine together (they prefill in the same steps) and wait until all
    are accepted, so validation errors become 400s; if one is refused, the others are aborted."""
    engine = _engine(state)
    params = params.with_eos_ids(state.extra_eos)
    if params.structured is not None:  # its grammar compiled here, on a worker, not on the engine's thread
        await state.workers.run(engine.engine.processor.prepare, params)
    results = await asyncio.gather(*(engine.submit(p, params, stream=stream) for p in prompts), return_exceptions=True)
    failure = next((r for r in results if isinstance(r, BaseException)), None)
    if failure is None:
        return list(results)
    for r in results:
        if not isinstance(r, BaseException):
            r.close()
    raise failure


@contextmanager
def _request_errors(body: CompletionRequest | ChatCompletionRequest) -> Iterator[None]:
    """r1kit's errors (``SamplingParams``' checks, the engine's) as 400s whose ``param`` is the field
    of this request they are about: chat's prompt is its ``messages``, its logprobs ``top_logprobs``."""
    try:
        yield
    except UNAVAILABLE:
        raise
    except R1kitError as exc:
        raise APIError(400, str(exc), param=body.field(exc.param)) from None


async def _final(stream: AsyncIterator[RequestOutput]) -> RequestOutput:
    last = None
    async for last in stream:
        pass
    return last


async def _all_final(streams: list[RequestStream]) -> list[RequestOutput]:
    # a coroutine, not the bare gather future: cancelled, it ends cancelled rather than holding an
    # exception that asyncio reports as never retrieved
    return await asyncio.gather(*(_final(s) for s in streams))


async def _finals(request: Request, streams: list[RequestStream]) -> list[RequestOutput]:
    """Each request's final output. A client that leaves meanwhile (one that timed out) aborts them:
    no one would read the answer, and their engine slots are the next clients'."""
    try:
        return await _unless_disconnected(request, _all_final(streams))
    finally:
        for s in streams:
            s.close()


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """``work``'s result, unless the client disconnects first: then ``work`` is cancelled."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        task.cancel()  # a no-op once done
    if task.done() and not task.cancelled():
        return task.result()
    # no one reads this answer; it ends the handler quietly (an exception would be logged as a failure)
    raise APIError(499, "the client closed the connection before the answer was ready")


async def _disconnected(request: Request) -> None:
    # the guard handed the body over whole: what the connection says next is its disconnect
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _stream_response(events: AsyncIterator[str], streams: list[RequestStream]) -> StreamingResponse:
    """Server-sent events. A stream the engine fails midway (a shutdown past its grace period, a
    failed step) ends with an error event and ``[DONE]``, which a client tells from a cut connection;
    one whose client leaves aborts its requests."""

    async def guarded() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield event
        except Exception as exc:  # noqa: BLE001 (the 200 is sent: the client hears of it in the stream)
            kind = "service_unavailable" if isinstance(exc, UNAVAILABLE) else "invalid_request_error" if isinstance(exc, R1kitError) else "server_error"
            yield _sse({"error": _error(str(exc), kind)})
            yield DONE
        finally:
            for s in streams:
                s.close()

    return StreamingResponse(guarded(), media_type="text/event-stream")


async def _json(state: ServerState, build: Callable[..., dict[str, Any]], *args: Any) -> Response:
    """``build(*args)`` as a JSON response, built and serialized on a worker: an echo's logprobs or
    a long output's run to megabytes of JSON."""

    def render() -> bytes:
        return json.dumps(build(*args), ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")

    return Response(await state.workers.finish(render), media_type="application/json")


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
async def _completions(state: ServerState, body: CompletionRequest, request: Request):
    engine = _engine(state)
    echo_only = body.echo and body.max_tokens == 0  # lm-eval's loglikelihood: score the prompt only
    max_tokens = 1 if echo_only else (body.max_tokens if body.max_tokens is not None else state.sampling_defaults.get("max_tokens", 16))
    prompt_logprobs = body.logprobs if body.echo and body.logprobs is not None else None
    request_id = f"cmpl-{uuid.uuid4().hex}"
    with _request_errors(body):
        # on a worker: a structured-output spec is checked by the grammar library, imported by the first one
        params = await state.workers.run(body.sampling, max_tokens, body.logprobs, prompt_logprobs, state.sampling_defaults)
        prompts = body.prompts() if body.suffix is None else _fim_prompts(state, body)
    if len(prompts) > engine.max_waiting:  # could never be admitted together: a 400, not a 503 to retry
        raise APIError(400, f"prompt: a batch of {len(prompts)} prompts is more than the {engine.max_waiting} requests this server "
                            "holds at once (--max-waiting); send fewer per request", param="prompt")  # fmt: skip
    prompts = await state.workers.run(_with_ids, state.tokenizer, prompts)
    with _request_errors(body):
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
                        text = (out.prompt or await state.workers.finish(decode, state.tokenizer, out.prompt_token_ids)) + text
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
            yield DONE

        return _stream_response(events(), streams)

    finals = await _finals(request, streams)
    return await _json(state, _completion_body, state, body, finals, request_id, created)


def _with_ids(tokenizer, prompts: list[str | list[int]]) -> list[dict[str, Any] | list[int]]:
    """Text prompts with their token ids, encoded as the engine would (with the tokenizer's special
    tokens, as vLLM encodes a completion's), here on a worker rather than on the engine's thread."""
    texts = [p for p in prompts if isinstance(p, str)]
    ids = iter(encode(tokenizer, texts, add_special_tokens=True) if texts else ())
    return [{"prompt": p, "prompt_token_ids": next(ids)} if isinstance(p, str) else p for p in prompts]


def _completion_body(state: ServerState, body: CompletionRequest, finals: list[RequestOutput], request_id: str, created: int) -> dict[str, Any]:
    """The whole (non-streamed) completion response (on a worker)."""
    echo_only = body.echo and body.max_tokens == 0
    choices = []
    for i, out in enumerate(finals):
        prompt_text = out.prompt or decode(state.tokenizer, out.prompt_token_ids)
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
    return [state.fim.prompt(p, body.suffix) for p in prompts]  # a marker in the text: FimError, a 400


# -- /v1/chat/completions ----------------------------------------------------------------------------
def _chat_prompt(state: ServerState, body: ChatCompletionRequest) -> tuple[str, list[int]]:
    """The rendered chat prompt and its ids (on a worker: a long conversation renders and encodes slowly)."""
    prompt = _render(state, template_messages(body.messages), body.add_generation_prompt)
    return prompt, encode(state.tokenizer, [prompt], add_special_tokens=False)[0]  # the template wrote any BOS


async def _chat(state: ServerState, body: ChatCompletionRequest, request: Request):
    engine = _engine(state).engine
    prompt, ids = await state.workers.run(_chat_prompt, state, body)
    max_tokens = body.requested_max_tokens()
    if max_tokens is None:
        room = max(1, engine.max_model_len - len(ids))
        max_tokens = min(room, state.sampling_defaults.get("max_tokens", room))
    top_n = body.top_logprobs or 0
    with _request_errors(body):
        params = await state.workers.run(body.sampling, max_tokens, top_n if body.logprobs else None, None, state.sampling_defaults)
        (stream,) = await _submit(state, [{"prompt": prompt, "prompt_token_ids": ids}], params, bool(body.stream))
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    # a model that never reasons (no </think> token) keeps its whole answer in content; one whose
    # prompt ends inside <think> (R1) starts in reasoning; any other starts in content
    reasoning = state.reasoning and engine.special.think_end is not None
    starts_in_reasoning = engine.processor.opens_reasoning(ids)

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
            yield DONE

        return _stream_response(events(), [stream])

    (out,) = await _finals(request, [stream])
    return await _json(state, _chat_body, state, body, out, request_id, created, starts_in_reasoning, reasoning)


def _chat_body(state: ServerState, body: ChatCompletionRequest, out: RequestOutput, request_id: str, created: int,
               starts_in_reasoning: bool, reasoning: bool) -> dict[str, Any]:  # fmt: skip
    """The whole (non-streamed) chat response (on a worker)."""

    def message_parts(text: str) -> dict[str, Any]:
        if not reasoning:
            return {"content": text}
        thought, answer = split_reasoning(text, starts_in_reasoning)
        return {"content": answer, "reasoning_content": thought, "reasoning": thought}

    choices = [
        {
            "index": c.index,
            "message": {"role": "assistant", **message_parts(c.text)},
            "logprobs": _chat_logprobs(state, c.token_ids, c.logprobs or [], body.top_logprobs or 0) if body.logprobs else None,
            "finish_reason": c.finish_reason,
        }
        for c in out.outputs
    ]
    return {
        "id": request_id, "object": "chat.completion", "created": created, "model": state.model_name, "choices": choices,
        "usage": _usage(len(out.prompt_token_ids), sum(len(c.token_ids) for c in out.outputs), out.num_cached_tokens),
    }  # fmt: skip
