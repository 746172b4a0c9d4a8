"""Load test of `r1kit serve` on loopback against the engine called directly, in one run.

Builds a model directory (a tokenizer trained on a few standard-library files and a randomly
initialised model of the given config), starts the server on 127.0.0.1, and sends streaming
completion requests from 1, 8 and 32 concurrent clients (bounded: a fixed number of requests per
level). Prints requests/s, generated tokens/s, time to first token and inter-token latency
(p50/p99; under load the server coalesces the tokens a slow reader missed into one event, so this
is the gap between events) and the load generator's own CPU use (it shares the machine). Then the
overhead: all requests sent at once, against `LLMEngine` serving the same requests queued at once
in-process with the same ``max_num_seqs``.

    python benchmarks/bench_serve.py [--config configs/tiny-cpu.yaml] [--requests 64] [--max-tokens 32] [--stream-interval 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch


def build_model_dir(config: str, out: Path) -> Path:
    import dataclasses
    import email
    import json as json_module

    from r1kit.config import ModelConfig
    from r1kit.tokenizer import EOS, train_tokenizer
    from r1kit.model import R1kitForCausalLM

    tok = train_tokenizer([Path(m.__file__).read_text() for m in (json_module, email, socket, subprocess, argparse)], vocab_size=2048)
    out.mkdir(parents=True)
    tok.save(str(out / "tokenizer.json"))
    cfg = dataclasses.replace(ModelConfig.from_yaml(config), vocab_size=tok.get_vocab_size(), eos_token_id=tok.token_to_id(EOS))
    torch.manual_seed(0)
    R1kitForCausalLM(cfg).save_pretrained(out)
    return out


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


class _Connection:
    """A minimal HTTP/1.1 keep-alive client for streamed completions. The load generator shares this
    machine's two cores with the server, so it parses as little as it can: chunk framing and the
    ``data:`` events, no JSON (httpx + json.loads per event cost the server a visible share of a core)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def stream(self, body: dict) -> list[float]:
        """POST /v1/completions; the arrival time of every event that carries text."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        payload = json.dumps(body).encode()
        self.writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                          % (self.host.encode(), len(payload), payload))  # fmt: skip
        head = await self.reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(head.decode(errors="replace"))
        if b"transfer-encoding: chunked" not in head.lower():
            raise RuntimeError("expected a chunked event stream")
        times, buffer = [], b""
        while True:
            size = int((await self.reader.readuntil(b"\r\n"))[:-2], 16)
            data = await self.reader.readexactly(size + 2)
            if size == 0:
                return times
            buffer += data[:-2]
            *events, buffer = buffer.split(b"\n\n")
            now = time.perf_counter()
            for event in events:
                if event.startswith(b"data: {") and b'"text":""' not in event:
                    times.append(now)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def client_load(base: str, prompts: list[str], concurrency: int, max_tokens: int) -> dict[str, float]:
    host, port = base.removeprefix("http://").split(":")
    queue: asyncio.Queue = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    ttft, itl, tokens = [], [], 0

    async def worker() -> None:
        nonlocal tokens
        conn = _Connection(host, int(port))
        try:
            while not queue.empty():
                prompt = queue.get_nowait()
                body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True}
                start = time.perf_counter()
                times = await conn.stream(body)
                if times:
                    ttft.append(times[0] - start)
                    itl.extend(b - a for a, b in zip(times, times[1:]))
                tokens += max_tokens
        finally:
            conn.close()

    cpu = time.process_time()
    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    return {
        "req_s": len(prompts) / elapsed, "tok_s": tokens / elapsed, "client_cpu": (time.process_time() - cpu) / elapsed,
        "ttft_p50": percentile(ttft, 0.5), "ttft_p99": percentile(ttft, 0.99), "itl_p50": percentile(itl, 0.5), "itl_p99": percentile(itl, 0.99),
    }  # fmt: skip


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of each thread of ``pid`` by thread name, from Linux's /proc."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended between listing and reading
            continue
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return out


def direct_engine(model_dir: Path, max_num_seqs: int):
    from r1kit.tokenizer import load_tokenizer
    from r1kit.infer.engine import EngineConfig, LLMEngine
    from r1kit.checkpoints import load_model

    return LLMEngine(load_model(model_dir), load_tokenizer(model_dir), EngineConfig(max_num_seqs=max_num_seqs, kv_cache_memory=64 << 20),
                     take_model=True)


def engine_direct(engine, prompts: list[str], max_tokens: int) -> float:
    """Tokens/s of the engine serving the same requests in-process, all queued at once."""
    from r1kit.infer.sampling import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    for p in prompts:
        engine.add_request(None, p, params)
    while engine.has_unfinished_requests():
        engine.step()
    return len(prompts) * max_tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny-cpu.yaml", help="model config to initialise")
    parser.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated client counts")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of the server and of the in-process engine (default torch's: every core; "
                             "1 on a 2-core box leaves the HTTP loop a core of its own, as a real deployment has)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating server / in-process rounds for the overhead figure")
    parser.add_argument("--stream-interval", type=int, default=1, help="the server's --stream-interval (tokens per streamed chunk)")
    args = parser.parse_args()
    env = os.environ.copy()
    if args.threads:
        torch.set_num_threads(args.threads)
        env["OMP_NUM_THREADS"] = str(args.threads)
    prompts = [f"def function_{i}(value):\n    return" for i in range(args.requests)]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model_dir(args.config, Path(tmp) / "bench")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        max_seqs = max(int(x) for x in args.concurrency.split(","))
        log = open(Path(tmp) / "server.log", "w")
        server = subprocess.Popen(
            [sys.executable, "-m", "r1kit.cli", "serve", "--model", str(model_dir), "--port", str(port), "--served-model-name", "bench", "--kv-cache-memory", str(64 << 20), "--max-num-seqs", str(max_seqs), "--stream-interval", str(args.stream_interval)],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        try:
            for _ in range(300):
                try:
                    if httpx.get(base + "/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            asyncio.run(client_load(base, prompts[:4], 4, 4))  # warm-up
            print(f"model {args.config}, {args.requests} requests x {args.max_tokens} tokens per level, greedy, streaming "
                  f"(stream interval {args.stream_interval}), {torch.get_num_threads()} torch threads on {os.cpu_count()} CPUs")
            print(f"{'clients':>8} {'req/s':>8} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8} {'client CPU':>10}")
            for c in [int(x) for x in args.concurrency.split(",")]:
                r = asyncio.run(client_load(base, prompts, c, args.max_tokens))
                print(f"{c:>8} {r['req_s']:>8.2f} {r['tok_s']:>8.1f} {r['ttft_p50'] * 1e3:>7.0f}ms {r['ttft_p99'] * 1e3:>7.0f}ms {r['itl_p50'] * 1e3:>6.0f}ms {r['itl_p99'] * 1e3:>6.0f}ms {100 * r['client_cpu']:>9.0f}%")
            # The overhead: the same requests all sent at once to the server (one client each) and all
            # queued at once in an in-process engine with the same max_num_seqs, alternately, best of
            # each (this box is noisy). Sending them at once keeps the clients' own round trips (a
            # closed loop idles the engine between a client's requests) out of the server's figure.
            engine = direct_engine(model_dir, max_seqs)
            engine_direct(engine, prompts[:4], 4)  # warm-up
            served = direct = http_cpu = 0.0
            for _ in range(args.rounds):
                direct = max(direct, engine_direct(engine, prompts, args.max_tokens))
                before = thread_cpu(server.pid).get("r1kit-http", 0.0)
                served = max(served, asyncio.run(client_load(base, prompts, len(prompts), args.max_tokens))["tok_s"])
                http_cpu += thread_cpu(server.pid).get("r1kit-http", 0.0) - before
            print(f"{len(prompts)} requests at once, {max_seqs} running at a time, best of {args.rounds} rounds: engine called directly "
                  f"{direct:.1f} tok/s | server {served:.1f} tok/s ({served / direct:.2f}x, {100 * (1 - served / direct):.1f}% lost)")  # fmt: skip
            tokens = args.rounds * len(prompts) * args.max_tokens
            print(f"the server's HTTP thread: {1e6 * http_cpu / tokens:.0f} µs of CPU per streamed token "
                  f"({100 * http_cpu * served / tokens:.0f}% of a core at the served rate)")
        finally:
            server.terminate()
            server.wait(timeout=60)


if __name__ == "__main__":
    main()
