"""Measuring the engine: decode rate, time to first token, prefix-cache hits, long contexts (prefill
time, decode rate, KV memory held per request), the machine's memory bandwidth. ``r1kit bench`` and
the scripts in ``benchmarks/`` share these functions."""

from __future__ import annotations

import time

import torch


def random_prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=g).tolist() for _ in range(count)]


def time_engine(llm, prompts: list[list[int]], new_tokens: int) -> dict[str, float]:
    """Run all prompts concurrently; decode rate is measured once every request has its first token."""
    from r1kit.infer.sampling import SamplingParams

    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    for p in prompts:
        engine.add_request(None, p, params)
    first: dict[str, float] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            first.setdefault(out.request_id, time.perf_counter())
    end = time.perf_counter()
    all_started = max(first.values())
    decode_tokens = len(prompts) * (new_tokens - 1)
    return {
        "ttft": sum(t - start for t in first.values()) / len(first),
        "decode_tps": decode_tokens / max(end - all_started, 1e-9),
        "total_tps": len(prompts) * new_tokens / (end - start),
    }


def time_arrivals(llm, prompts: list[list[int]], new_tokens: int, per_step: int | None) -> float:
    """Tokens/s when ``per_step`` requests join before each step (None: all before the first), the
    way a server's requests trickle in: most steps then mix prefills with decodes."""
    from r1kit.infer.sampling import SamplingParams

    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    pending = list(prompts)
    start = time.perf_counter()
    while pending or engine.has_unfinished_requests():
        for p in pending[: per_step or len(pending)]:
            engine.add_request(None, p, params)
        del pending[: per_step or len(pending)]
        engine.step()
    return len(prompts) * new_tokens / (time.perf_counter() - start)


def time_reference(model, prompts: list[list[int]], new_tokens: int) -> dict[str, float]:
    """The reference loop, one request after another."""
    from r1kit.infer.generate import stream_tokens
    from r1kit.infer.sampling import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    ttft = decode_time = 0.0
    start = time.perf_counter()
    for p in prompts:
        t0 = time.perf_counter()
        for i, _ in enumerate(stream_tokens(model, p, params)):
            if i == 0:
                t1 = time.perf_counter()
                ttft += t1 - t0
        decode_time += time.perf_counter() - t1
    end = time.perf_counter()
    return {
        "ttft": ttft / len(prompts),
        "decode_tps": len(prompts) * (new_tokens - 1) / max(decode_time, 1e-9),
        "total_tps": len(prompts) * new_tokens / (end - start),
    }


def time_prefix_ttft(llm, length: int, vocab: int, seed: int) -> tuple[float, float, int]:
    """(cold TTFT, cached TTFT, cached tokens) for one ``length``-token prompt run twice."""
    from r1kit.infer.sampling import SamplingParams

    prompt = random_prompts(1, length, vocab, seed + 1)[0]
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    t0 = time.perf_counter()
    llm.generate([prompt], params)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = llm.generate([prompt], params)[0]
    return cold, time.perf_counter() - t0, out.num_cached_tokens


def memory_bandwidth(device: str = "cpu", mib: int = 256) -> tuple[float, float]:
    """(copy: bytes read + written per second by a large tensor copy, read: bytes per second of a
    large sum), best of 5 each. A decode step only reads its weights, so it can pass the copy figure."""
    src = torch.ones(mib * 2**20 // 4, device=device)
    dst = torch.empty_like(src)

    def best(op) -> float:
        fastest = float("inf")
        for _ in range(5):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            op()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            fastest = min(fastest, time.perf_counter() - t0)
        return fastest

    nbytes = src.numel() * 4
    return 2 * nbytes / best(lambda: dst.copy_(src)), nbytes / best(src.sum)


def model_bytes(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def kv_bytes_held(engine, seq) -> int:
    """The KV-cache bytes ``seq`` holds now: its main blocks (every layer that keeps the whole context,
    and pooled entries) and its window-group blocks (windowed layers, only what their window reads)."""
    from r1kit.infer.paged_cache import bytes_per_block

    mc, size, dtype = engine.model.config, engine.config.block_size, engine.model.dtype
    held = sum(b >= 0 for b in seq.block_table) * bytes_per_block(mc, size, dtype)
    if engine.window_blocks:
        held += sum(b >= 0 for b in engine.block_manager.window_table(seq)) * bytes_per_block(mc, size, dtype, "window")
    return held


def time_long_context(llm, prompt: list[int], new_tokens: int, batch: int) -> dict[str, float]:
    """One long ``prompt``, cold: ``prefill_s`` (time to its first token), ``decode_tps`` (one sequence),
    ``kv_bytes`` (the most its KV cache held while decoding: what a request holds for its life; a
    prefill step also holds its chunk's K/V in every layer); then ``batch`` completions of the same prompt
    together (its blocks served by the prefix cache, so only the last block is prefilled again):
    ``batch_decode_tps``, tokens/s over the steps after every completion's first token."""
    from r1kit.infer.sampling import SamplingParams

    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    engine.add_request(None, prompt, params)
    first = None
    kv_bytes = 0
    while engine.has_unfinished_requests():
        outs = engine.step()
        if first is None and outs:
            first = time.perf_counter()
        elif first is not None:
            kv_bytes = max([kv_bytes] + [kv_bytes_held(engine, seq) for seq in engine.scheduler.running])
    end = time.perf_counter()
    result = {"prefill_s": first - start, "decode_tps": (new_tokens - 1) / max(end - first, 1e-9), "kv_bytes": float(kv_bytes)}
    engine.add_request(None, prompt, SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True, n=batch))
    started = None
    while engine.has_unfinished_requests():
        engine.step()
        if started is None and all(seq.num_output_tokens > 0 for seq in engine.scheduler.running) and len(engine.scheduler.running) == batch:
            started, produced = time.perf_counter(), sum(seq.num_output_tokens for seq in engine.scheduler.running)
    result["batch_decode_tps"] = (batch * new_tokens - produced) / max(time.perf_counter() - started, 1e-9)
    return result
