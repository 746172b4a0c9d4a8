"""`r1kit serve`: the OpenAI-compatible HTTP server (the seed's `serve.py --port 8080`).

The socket opens at once and ``/health`` answers 503 while the model loads, 200 once the engine
loop runs; SIGTERM stops accepting new requests, lets in-flight ones finish for
``--shutdown-timeout`` seconds, then aborts the rest.
"""

from __future__ import annotations

import argparse
import ctypes
import signal
import sys
import threading
from pathlib import Path

from r1kit.generation_config import MODES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model directory (config.json, weights, tokenizer.json), .gguf file or pulled model name")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 in containers)")
    parser.add_argument("--port", type=int, default=8080, help="port (default 8080, the seed's)")
    parser.add_argument("--served-model-name", help="the model id clients send (default: the directory name)")
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on the API routes")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto", help="weights dtype (default: the checkpoint's; float16 runs as bfloat16 in the engine on the CPU)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--max-num-seqs", type=int, default=64, help="most sequences decoded together (default 64)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget of one engine step (default 2048)")
    parser.add_argument("--max-model-len", type=int, help="longest prompt + output (default: the model's max_seq_len)")
    parser.add_argument("--kv-cache-memory", type=int, help="bytes for the KV-cache pool (default: a share of free memory)")
    parser.add_argument("--max-waiting", type=int, default=256, help="requests in flight before new ones get 503 (default 256)")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body accepted (default 1 MiB; larger: 413)")
    parser.add_argument("--reasoning-parser", choices=["deepseek_r1", "none"], default="deepseek_r1",
                        help="split <think>…</think> into reasoning_content (default deepseek_r1; a model whose prompt does not open <think> answers in content)")
    parser.add_argument("--generation-config", choices=MODES, default="auto",
                        help="auto (default): the model's generation_config.json sets the default temperature, top_k, top_p, min_p, "
                             "repetition_penalty and max_tokens (vLLM's rule); none: r1kit's defaults. Its eos_token_id applies in both")
    parser.add_argument("--stream-interval", type=int, default=1,
                        help="tokens per streamed chunk (default 1: every token at once; more: less server work per token)")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds in-flight requests get to finish on SIGTERM (default 30)")


def load_state(args: argparse.Namespace, state) -> None:
    """Load the model and build the engine loop (while the already-listening server answers 503)."""
    from r1kit.checkpoints.load import load_model, resolve_model
    from r1kit.data.tokenizer import load_tokenizer
    from r1kit.fim import detect_fim
    from r1kit.generation_config import GenerationConfig
    from r1kit.infer.engine import EngineConfig, LLMEngine
    from r1kit.infer.generate_cli import DTYPES
    from r1kit.serve.async_engine import AsyncEngine
    from r1kit.serve.chat_template import ChatTemplate

    model_dir = resolve_model(args.model)
    generation = GenerationConfig.for_model(model_dir, args.generation_config)
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, dtype=DTYPES[args.dtype], device=args.device)
    config = EngineConfig(
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        kv_cache_memory=args.kv_cache_memory,
    )
    engine = LLMEngine(model, tokenizer, config)
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
    from r1kit.serve.metrics import ServerMetrics

    # The engine loop and the HTTP event loop share the GIL; with Python's default 5 ms switch
    # interval either can hold the other up for a whole slice (ITL p99 31 ms instead of 109 ms at
    # 32 streams, benchmarks/bench_serve.py).
    sys.setswitchinterval(0.001)
    name = args.served_model_name or (Path(args.model).resolve().name if Path(args.model).exists() else args.model)
    state = ServerState(model_name=name, api_key=args.api_key, max_body_bytes=args.max_body_bytes, reasoning=args.reasoning_parser != "none")
    state.metrics = ServerMetrics(name)
    server = uvicorn.Server(uvicorn.Config(build_app(state), host=args.host, port=args.port, log_level="warning", access_log=False, timeout_graceful_shutdown=args.shutdown_timeout))
    http_done = threading.Event()

    def serve_http() -> None:  # uvicorn installs no signal handlers off the main thread: ours below
        name_os_thread("r1kit-http")
        try:
            server.run()
        finally:
            http_done.set()
            if state.engine is not None:
                state.engine.request_stop()  # in-flight requests were finished or aborted by uvicorn

    def on_signal(signum, frame) -> None:
        # the first signal stops accepting and lets in-flight requests finish (--shutdown-timeout);
        # the engine loop keeps running for them until the HTTP server is done
        server.force_exit = server.should_exit
        server.should_exit = True

    http = threading.Thread(target=serve_http, name="r1kit-http", daemon=True)
    http.start()
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        load_state(args, state)  # /health answers 503 meanwhile
    except BaseException:
        server.should_exit = True
        http.join()
        raise
    if not http_done.is_set():
        if state.sampling_defaults:  # as vLLM, say so: results differ from r1kit's neutral defaults
            print(f"r1kit serve: default sampling from generation_config.json: {state.sampling_defaults} (--generation-config none: r1kit's)")
        print(f"r1kit serve: {name} ready on http://{args.host}:{args.port}", flush=True)
        state.engine.run()  # the main thread: see r1kit.serve.async_engine
    http.join()
    state.engine.stop()
    if not server.started:
        raise R1kitError(f"the HTTP server could not listen on {args.host}:{args.port} (in use? see the message above); pick another --port")
    return 0
