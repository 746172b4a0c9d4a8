"""`r1kit serve`: the OpenAI-compatible HTTP server (the seed's `serve.py --port 8080`).

The socket opens at once and ``/health`` answers 503 while the model loads, 200 once the engine
loop runs; SIGTERM stops accepting new requests, lets in-flight ones finish for
``--shutdown-timeout`` seconds, then aborts the rest (a stream ends with an error event).
The API key comes from ``--api-key-file`` or ``--api-key`` (which ``ps`` shows every user of the
machine), else ``$R1KIT_API_KEY`` (vLLM's ``VLLM_API_KEY``; a Kubernetes Secret).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import sys
import threading
from pathlib import Path

from r1kit.device import DTYPE_CHOICES, resolve_dtype
from r1kit.generation_config import MODES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model directory (config.json, weights, tokenizer.json), .gguf file or pulled model name")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 in containers)")
    parser.add_argument("--port", type=port, default=8080, help="port, 1-65535 (default 8080, the seed's)")
    parser.add_argument("--served-model-name", help="the model id clients send (default: the directory name)")
    key = parser.add_mutually_exclusive_group()
    key.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' on the API routes (visible in ps: prefer ${API_KEY_ENV} or --api-key-file)")
    key.add_argument("--api-key-file", type=Path, help=f"read the API key from this file (a mounted secret); default: ${API_KEY_ENV}, if set")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="weights dtype (default: the checkpoint's; float16 runs as bfloat16 in the engine on the CPU)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--max-num-seqs", type=int, default=64, help="most sequences decoded together (default 64)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget of one engine step (default 2048)")
    parser.add_argument("--max-model-len", type=int, help="longest prompt + output (default: the model's max_seq_len)")
    parser.add_argument("--kv-cache-memory", type=int, help="bytes for the KV-cache pool (default: a share of free memory)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1,
                        help="processes the model is split over (default 1): CPU processes (gloo), or on CUDA one GPU each from --device's (NCCL)")
    parser.add_argument("--max-waiting", type=int, default=256, help="requests in flight before new ones get 503 (default 256)")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body accepted (default 1 MiB; larger: 413)")
    parser.add_argument("--read-timeout", type=float, default=10.0,
                        help="seconds a client has to send a request's headers, and then its body (default 10; slower: closed, or 408)")
    parser.add_argument("--reasoning-parser", choices=["deepseek_r1", "none"], default="deepseek_r1",
                        help="split <think>…</think> into reasoning_content (default deepseek_r1; a model whose prompt does not open <think> answers in content)")
    parser.add_argument("--generation-config", choices=MODES, default="auto",
                        help="auto (default): the model's generation_config.json sets the default temperature, top_k, top_p, min_p, "
                             "repetition_penalty and max_tokens (vLLM's rule); none: r1kit's defaults. Its eos_token_id applies in both")
    parser.add_argument("--stream-interval", type=int, default=1,
                        help="tokens per streamed chunk (default 1: every token at once; more: less server work per token)")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds in-flight requests get to finish on SIGTERM (default 30)")
    parser.add_argument("--app", choices=["support"], help="also serve an application: support (the customer-service assistant: /v1/support/..., the chat page /support)")


API_KEY_ENV = "R1KIT_API_KEY"
KEEP_ALIVE_S = 5  # an idle keep-alive connection is closed after this (uvicorn's default, stated)
MAX_HEADER_BYTES = 64 << 10  # request line and headers; OpenAI clients send under 2 KiB
SHUTDOWN_GRACE_S = 5.0  # after --shutdown-timeout: for aborted streams to send their error event


def port(text: str) -> int:
    """``--port``: a TCP port; 0 or one past 65535 would make the server listen somewhere else."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port: give a number from 1 to 65535")
    return value


def api_key(args: argparse.Namespace) -> str | None:
    """The key from ``--api-key-file`` or ``--api-key``, else ``$R1KIT_API_KEY``; None: no key."""
    from r1kit.errors import ConfigError

    if args.api_key_file is not None:
        try:
            key = args.api_key_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"--api-key-file {args.api_key_file}: cannot read it ({exc.strerror})") from None
        if not key:
            raise ConfigError(f"--api-key-file {args.api_key_file} is empty: write the key into it")
        return key
    return args.api_key or os.environ.get(API_KEY_ENV) or None


def load_state(args: argparse.Namespace, state) -> None:
    """Load the model and build the engine loop (while the already-listening server answers 503)."""
    from r1kit.checkpoints.load import load_model, resolve_model
    from r1kit.tokenizer import load_tokenizer
    from r1kit.fim import detect_fim
    from r1kit.generation_config import GenerationConfig
    from r1kit.infer.engine import EngineConfig, LLMEngine
    from r1kit.serve.async_engine import AsyncEngine
    from r1kit.chat_template import ChatTemplate

    model_dir = resolve_model(args.model)
    generation = GenerationConfig.for_model(model_dir, args.generation_config)
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, dtype=resolve_dtype(args.dtype, "--dtype"), device=args.device)
    config = EngineConfig(
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        kv_cache_memory=args.kv_cache_memory,
        tensor_parallel_size=args.tensor_parallel_size,
    )
    engine = LLMEngine(model, tokenizer, config, take_model=True)
    state.tokenizer, state.template = tokenizer, ChatTemplate.from_model_dir(model_dir)
    state.sampling_defaults = generation.sampling_defaults()
    state.extra_eos = generation.extra_stop_ids(engine.special.eos, model.config.vocab_size)
    state.fim = detect_fim(tokenizer)
    state.engine = AsyncEngine(engine, max_waiting=args.max_waiting, observer=state.metrics, stream_interval=args.stream_interval)


def name_os_thread(name: str) -> None:
    """Name the calling thread for the OS too (``top -H``, ``/proc/PID/task/*/comm``, profilers), on
    Linux; Python 3.11's thread names stay inside Python."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # 15: PR_SET_NAME
        except (OSError, AttributeError):
            pass


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from r1kit.errors import R1kitError
    from r1kit.serve.app import ServerState, build_app
    from r1kit.serve.connections import bounded_protocol
    from r1kit.serve.metrics import ServerMetrics

    # The engine loop and the HTTP event loop share the GIL; with Python's default 5 ms switch
    # interval either can hold the other up for a whole slice, which shows in the tail of the
    # inter-token latency (benchmarks/README.md, "Server overhead").
    sys.setswitchinterval(0.001)
    name = args.served_model_name or (Path(args.model).resolve().name if Path(args.model).exists() else args.model)
    state = ServerState(model_name=name, api_key=api_key(args), max_body_bytes=args.max_body_bytes, body_timeout=args.read_timeout,
                        reasoning=args.reasoning_parser != "none")  # fmt: skip
    state.metrics = ServerMetrics(name)
    app = build_app(state)
    support = None
    if args.app == "support":
        from r1kit.apps.support.routes import SupportApp, mount

        support = mount(app, SupportApp())
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level="warning", access_log=False,
        http=bounded_protocol(args.read_timeout, MAX_HEADER_BYTES), timeout_keep_alive=KEEP_ALIVE_S,
        # uvicorn cancels what is left after this: by then our abort (below) has ended every stream
        timeout_graceful_shutdown=args.shutdown_timeout + SHUTDOWN_GRACE_S,
    )  # fmt: skip
    server = uvicorn.Server(config)
    http_done = threading.Event()

    def serve_http() -> None:  # uvicorn installs no signal handlers off the main thread: ours below
        name_os_thread("r1kit-http")
        try:
            server.run()
        finally:
            http_done.set()
            if state.engine is not None:
                state.engine.request_stop()  # in-flight requests were finished or aborted by uvicorn

    def abort_all() -> None:
        if state.engine is not None:
            state.engine.abort_all(f"the server is shutting down: the request did not finish within --shutdown-timeout {args.shutdown_timeout:g} s")

    def on_signal(signum, frame) -> None:
        # the first signal stops accepting and lets in-flight requests finish (--shutdown-timeout),
        # then aborts the rest; the engine loop keeps running for them until the HTTP server is done
        if server.should_exit:
            abort_all()  # a second signal: now
            server.force_exit = True
            return
        server.should_exit = True
        timer = threading.Timer(args.shutdown_timeout, abort_all)
        timer.daemon = True
        timer.start()

    http = threading.Thread(target=serve_http, name="r1kit-http", daemon=True)
    http.start()
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        load_state(args, state)  # /health answers 503 meanwhile
        if support is not None:
            from r1kit.apps.support.config import SupportConfig
            from r1kit.apps.support.loader import build_assistant

            support.assistant = build_assistant(SupportConfig(), state, args.model)
    except BaseException:
        server.should_exit = True
        http.join()
        raise
    if not http_done.is_set():
        if state.sampling_defaults:  # as vLLM, say so: results differ from r1kit's neutral defaults
            print(f"r1kit serve: default sampling from generation_config.json: {state.sampling_defaults} (--generation-config none: r1kit's)")
        print(f"r1kit serve: {name} ready on http://{args.host}:{args.port}", flush=True)
        workers = state.engine.engine.workers
        if workers is not None:  # a worker that dies stops the server, idle or not
            workers.watch(lambda exc: (setattr(server, "should_exit", True), state.engine.request_stop()))
        state.engine.run()  # the main thread: see r1kit.serve.async_engine
    http.join()
    state.engine.stop()
    workers = state.engine.engine.workers
    if workers is not None:
        dead = workers.dead
        workers.close()
        if dead is not None:
            raise dead
    if not server.started:
        raise R1kitError(f"the HTTP server could not listen on {args.host}:{args.port} (in use? see the message above); pick another --port")
    return 0
