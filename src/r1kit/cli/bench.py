"""`r1kit bench`: throughput and latency of the engine on a model directory or a random model from a config.

It prints, for each batch size, decode tokens/s (tokens after the first, over the time after every
request's first token), time to first token, and the achieved memory bandwidth at batch 1
(parameter bytes × tokens/s, gpt-fast's figure) beside the machine's measured copy and read bandwidth;
then the time to first token of a long prompt cold and with its prefix cached. With
``--reference`` it also times the reference loop (requests one after another) in the same run and
prints the ratio. With ``--context 4096,16384,32768`` it measures long contexts instead: for one
prompt of each length, the prefill time (to the first token), decode tokens/s of one sequence and of
``--context-batch`` completions of it, and the KV-cache memory the request held at most (windowed
layers hold only their window, a compressed hybrid its pooled entries). The measuring functions live
in :mod:`r1kit.infer.benchmark`.
"""

from __future__ import annotations

import argparse
import copy

import torch

from r1kit.device import DTYPE_CHOICES, resolve_dtype


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="model directory (config.json + model.safetensors), .gguf file or pulled model name")
    source.add_argument("--config", help="YAML model config: benchmark a randomly initialised model")
    parser.add_argument("--batch-sizes", default="1,8,16", help="comma-separated numbers of concurrent requests (default 1,8,16)")
    parser.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per request (default 128)")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per request (default 128)")
    parser.add_argument("--prefix-len", type=int, default=2048, help="prompt length of the cold vs cached time-to-first-token test; 0 skips it (default 2048)")
    parser.add_argument("--reference", action="store_true", help="also time the reference decoding loop and print engine/reference ratios")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="weights dtype (default: the checkpoint's, float32 for --config)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--block-size", type=int, default=16, help="KV-cache block size in tokens (default 16)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048, help="engine token budget per step (default 2048)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompts and random weights (default 0)")
    parser.add_argument("--context", default=None,
                        help="comma-separated prompt lengths, e.g. 4096,16384,32768: report prefill time, decode tokens/s and KV memory "
                             "per request at each instead of the batch table (--new-tokens decoded after each)")
    parser.add_argument("--context-batch", type=int, default=4, help="with --context: completions decoded together (default 4)")


def run(args: argparse.Namespace) -> int:
    from r1kit.infer.benchmark import memory_bandwidth, model_bytes, random_prompts, time_engine, time_prefix_ttft, time_reference
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
    dtype = resolve_dtype(args.dtype, "--dtype")
    if args.model:
        model = load_model(args.model, dtype=dtype, device=args.device)
    else:
        torch.manual_seed(args.seed)
        model = R1kitForCausalLM(ModelConfig.from_yaml(args.config)).to(device=resolve_device(args.device, "--device"), dtype=dtype or torch.float32)
    model.eval()
    cfg = model.config
    if args.context:
        return _run_contexts(args, model)
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


def _run_contexts(args: argparse.Namespace, model) -> int:
    from tqdm import tqdm

    from r1kit.errors import ConfigError
    from r1kit.infer.benchmark import random_prompts, time_long_context
    from r1kit.infer.llm import LLM

    cfg = model.config
    try:
        contexts = [int(c) for c in args.context.split(",") if c.strip()]
    except ValueError:
        raise ConfigError(f"--context={args.context!r} must be comma-separated whole numbers, e.g. 4096,16384,32768") from None
    if not contexts or min(contexts) < 2 or args.new_tokens < 2 or args.context_batch < 1:
        raise ConfigError("--context lengths must be >= 2, --new-tokens >= 2 and --context-batch >= 1")
    max_len = max(contexts) + args.new_tokens
    if max_len > cfg.max_seq_len:
        raise ConfigError(f"--context {max(contexts)} + --new-tokens {args.new_tokens} = {max_len} positions; the model's max_seq_len is "
                          f"{cfg.max_seq_len} (raise it in the config, or shorten --context)")
    kinds = ", ".join(sorted(set(cfg.attention)))
    print(f"model: {cfg.num_layers} layers ({kinds}; hybrid_global {cfg.hybrid_global}), local window {cfg.local_window}, "
          f"{model.dtype}, device {args.device}, {torch.get_num_threads()} threads")
    rows = []
    for context in tqdm(contexts, desc="contexts", unit="ctx"):
        # a fresh engine per length: its pool sized for this length and these sequences, nothing cached
        llm = LLM(model, max_num_seqs=args.context_batch, max_model_len=context + args.new_tokens, block_size=args.block_size,
                  max_num_batched_tokens=args.max_num_batched_tokens)
        prompt = random_prompts(1, context, cfg.vocab_size, args.seed + context)[0]
        rows.append((context, time_long_context(llm, prompt, args.new_tokens, args.context_batch)))
        del llm
    batch = f"decode tok/s x{args.context_batch}"
    print(f"{'context':>8} {'prefill s':>10} {'decode tok/s':>13} {batch:>18} {'KV MiB/request':>15}")
    for context, r in rows:
        print(f"{context:>8} {r['prefill_s']:>10.3f} {r['decode_tps']:>13.1f} {r['batch_decode_tps']:>18.1f} {r['kv_bytes'] / 2**20:>15.2f}")
    return 0
