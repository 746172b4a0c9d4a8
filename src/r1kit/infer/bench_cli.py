"""`r1kit bench`: throughput and latency of the engine on a model directory or a random model from a config.

It prints, for each batch size, decode tokens/s (tokens after the first, over the time after every
request's first token), time to first token, and the achieved memory bandwidth at batch 1
(parameter bytes × tokens/s, gpt-fast's figure) beside the machine's measured copy and read bandwidth;
then the time to first token of a long prompt cold and with its prefix cached. With
``--reference`` it also times the reference loop (requests one after another) in the same run and
prints the ratio. The measuring functions are reused by ``benchmarks/bench_engine.py``.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from r1kit.infer.llm import DTYPES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="model directory (config.json + model.safetensors), .gguf file or pulled model name")
    source.add_argument("--config", help="YAML model config: benchmark a randomly initialised model")
    parser.add_argument("--batch-sizes", default="1,8,16", help="comma-separated numbers of concurrent requests (default 1,8,16)")
    parser.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per request (default 128)")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per request (default 128)")
    parser.add_argument("--prefix-len", type=int, default=2048, help="prompt length of the cold vs cached time-to-first-token test; 0 skips it (default 2048)")
    parser.add_argument("--reference", action="store_true", help="also time the reference decoding loop and print engine/reference ratios")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="auto", help="weights dtype (default: the checkpoint's, float32 for --config)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--block-size", type=int, default=16, help="KV-cache block size in tokens (default 16)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048, help="engine token budget per step (default 2048)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompts and random weights (default 0)")


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


def run(args: argparse.Namespace) -> int:
    from r1kit.config import ModelConfig
    from r1kit.device import resolve_device
    from r1kit.errors import ConfigError
    from r1kit.infer.llm import LLM
    from r1kit.checkpoints.load import load_model
    from r1kit.model.transformer import R1kitForCausalLM

    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    if not sizes or min(sizes) < 1 or args.prompt_len < 1 or args.new_tokens < 2:
        raise ConfigError("--batch-sizes must be positive, --prompt-len >= 1 and --new-tokens >= 2")
    dtype = DTYPES[args.dtype]
    if args.model:
        model = load_model(args.model, dtype=dtype, device=args.device)
    else:
        torch.manual_seed(args.seed)
        model = R1kitForCausalLM(ModelConfig.from_yaml(args.config)).to(device=resolve_device(args.device, "--device"), dtype=dtype or torch.float32)
    model.eval()
    cfg = model.config
    max_len = max(args.prompt_len + args.new_tokens, args.prefix_len + 1)
    if max_len > cfg.max_seq_len:
        raise ConfigError(f"the benchmark needs {max_len} positions; the model's max_seq_len is {cfg.max_seq_len}")
    nbytes = model_bytes(model)
    # the engine packs its model's weights in place; the reference loop runs a plain copy
    plain = copy.deepcopy(model) if args.reference else None
    llm = LLM(model, max_num_seqs=max(sizes), max_model_len=max_len, block_size=args.block_size,
              max_num_batched_tokens=args.max_num_batched_tokens)
    print(f"model: {nbytes / 2**20:.1f} MiB of weights ({model.dtype}), {cfg.num_layers} layers, hidden {cfg.hidden_size}; "
          f"device {args.device}, {torch.get_num_threads()} threads; KV pool {llm.llm_engine.num_blocks} blocks")
    bandwidth, read = memory_bandwidth(args.device)
    print(f"memory bandwidth: copy (read + write) {bandwidth / 1e9:.1f} GB/s, read {read / 1e9:.1f} GB/s")
    time_engine(llm, random_prompts(min(sizes), 16, cfg.vocab_size, args.seed + 99), 4)  # warm-up
    print(f"{'batch':>5} {'engine tok/s':>13} {'TTFT s':>8}" + (f" {'reference tok/s':>16} {'ratio':>6}" if args.reference else ""))
    for b in sizes:
        prompts = random_prompts(b, args.prompt_len, cfg.vocab_size, args.seed + b)
        eng = time_engine(llm, prompts, args.new_tokens)
        line = f"{b:>5} {eng['decode_tps']:>13.1f} {eng['ttft']:>8.3f}"
        if args.reference:
            ref = time_reference(plain, prompts, args.new_tokens)
            line += f" {ref['decode_tps']:>16.1f} {eng['decode_tps'] / ref['decode_tps']:>5.2f}x"
        print(line)
        if b == 1:
            achieved = nbytes * eng["decode_tps"]
            print(f"      batch-1 bandwidth: {achieved / 1e9:.1f} GB/s = {100 * achieved / bandwidth:.0f}% of copy, {100 * achieved / read:.0f}% of read bandwidth")
    if args.prefix_len:
        cold, cached, hit = time_prefix_ttft(llm, args.prefix_len, cfg.vocab_size, args.seed)
        print(f"TTFT of a {args.prefix_len}-token prompt: cold {cold:.3f} s, prefix cached ({hit} tokens) {cached:.4f} s: {cold / cached:.1f}x faster")
    return 0
