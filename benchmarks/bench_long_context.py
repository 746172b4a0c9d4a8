"""Benchmark: the engine serving ~100M models that differ only in their attention, at long contexts (issue 25).

Four models of the same size (hidden 768, 12 layers, 12 query / 4 KV heads, FFN 2048, a 32000-token
vocabulary with tied embeddings: ~100M parameters; a hybrid layer adds its small gate):

* ``global``: every layer global attention (the peer every figure is a ratio to);
* ``guide full``: the guide's pattern ``[local, local, local, hybrid]``, the hybrid's global branch full;
* ``guide compressed``: the same with ``hybrid_global: compressed`` (mean-pooled runs of 32 positions);
* ``all local``: every layer local.

Local windows are ``--window`` (256, the config's fixed default). For each context length and model,
a fresh engine serves one random prompt of that length cold and decodes ``--new-tokens`` after it
(:func:`r1kit.infer.benchmark.time_long_context`): prefill seconds (time to the first token), decode
tokens/s of that one sequence, decode tokens/s of ``--batch`` completions of the same prompt (its
blocks come from the prefix cache, so the batch costs one prefill), and the KV-cache bytes the request
held while decoding. Each figure is printed beside its ratio to the global model's in the same run
(speed: model / global; memory: global / model), and the table is written to ``--out`` as JSON.

This machine's CPU may be shared: timings are noisy, ratios from the same run are the figures to
read. 32K contexts take minutes per model on two cores (``--contexts 4096,16384,32768`` to include them).

Usage: python benchmarks/bench_long_context.py [--contexts 4096,16384] [--new-tokens 16] [--batch 4]
       [--window 256] [--threads N] [--dtype float32] [--out long_context.json]
"""

from __future__ import annotations

import argparse
import platform

import torch
from tqdm import tqdm

from r1kit.config import ModelConfig, dump_json
from r1kit.infer.benchmark import random_prompts, time_long_context
from r1kit.infer.llm import LLM
from r1kit.model import R1kitForCausalLM

SIZE = dict(vocab_size=32000, hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=4, intermediate_size=2048, tie_embeddings=True)
GUIDE = ["local", "local", "local", "hybrid"]
MODELS = {
    "global": dict(attention="global"),
    "guide full": dict(attention=GUIDE, hybrid_global="full"),
    "guide compressed": dict(attention=GUIDE, hybrid_global="compressed", hybrid_compress_block=32),
    "all local": dict(attention="local"),
}


def build(name: str, max_len: int, window: int, dtype: torch.dtype) -> R1kitForCausalLM:
    torch.manual_seed(0)  # the same weights wherever the shapes agree
    config = ModelConfig(**SIZE, **MODELS[name], local_window=window, max_local_window=max(window, 4096), max_seq_len=max_len)
    return R1kitForCausalLM(config).eval().to(dtype)


def measure(name: str, context: int, args: argparse.Namespace, dtype: torch.dtype) -> dict[str, float]:
    model = build(name, context + args.new_tokens, args.window, dtype)
    # the prompt's blocks once, plus each completion's window, new tokens and slack (the window group
    # reserves a window per sequence): the pool is sized for this run, not for every sequence at full length
    per_seq = -(-(args.window + args.new_tokens) // args.block_size) + 4
    blocks = -(-(context + args.new_tokens) // args.block_size) + args.batch * per_seq
    llm = LLM(model, max_num_seqs=args.batch, max_model_len=context + args.new_tokens, block_size=args.block_size,
              max_num_batched_tokens=args.max_num_batched_tokens, num_kv_blocks=blocks)
    prompt = random_prompts(1, context, SIZE["vocab_size"], seed=context)[0]
    return time_long_context(llm, prompt, args.new_tokens, args.batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", default="4096,16384", help="comma-separated prompt lengths (default 4096,16384; add 32768 for 32K)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of: {', '.join(MODELS)} (global is always run)")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens decoded after each prompt (default 16)")
    parser.add_argument("--batch", type=int, default=4, help="completions decoded together for the batch figure (default 4)")
    parser.add_argument("--window", type=int, default=256, help="local attention window (default 256)")
    parser.add_argument("--block-size", type=int, default=16, help="KV block size in tokens (default 16)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048, help="prefill chunk budget per step (default 2048)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weights and KV dtype (default float32)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", default="long_context.json", help="where to write the table as JSON (default long_context.json)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    contexts = [int(c) for c in args.contexts.split(",") if c.strip()]
    names = ["global"] + [n.strip() for n in args.models.split(",") if n.strip() and n.strip() != "global"]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    dtype = getattr(torch, args.dtype)
    params = build("global", 64, args.window, dtype)
    print(f"{sum(p.numel() for p in params.parameters()) / 1e6:.1f}M parameters (global), {args.dtype}, window {args.window}, "
          f"{torch.get_num_threads()} threads on {platform.processor() or platform.machine()}; decode of {args.new_tokens} tokens, "
          f"batch {args.batch}")
    del params
    results: dict[int, dict[str, dict[str, float]]] = {}
    with tqdm(total=len(contexts) * len(names), desc="runs", unit="model") as bar:
        for context in contexts:
            results[context] = {}
            for name in names:
                bar.set_postfix_str(f"{name} @ {context}")
                results[context][name] = measure(name, context, args, dtype)
                bar.update()
    header = (f"{'context':>7} {'model':<17} {'prefill s':>10} {'x':>6} {'tok/s b1':>9} {'x':>6} {f'tok/s b{args.batch}':>9} {'x':>6} "
              f"{'KV MiB/seq':>11} {'less':>6}")
    print(header)
    for context, row in results.items():
        base = row["global"]
        for name, r in row.items():
            r["prefill_speedup"] = base["prefill_s"] / r["prefill_s"]
            r["decode_speedup"] = r["decode_tps"] / base["decode_tps"]
            r["batch_decode_speedup"] = r["batch_decode_tps"] / base["batch_decode_tps"]
            r["kv_reduction"] = base["kv_bytes"] / r["kv_bytes"]
            print(f"{context:>7} {name:<17} {r['prefill_s']:>10.2f} {r['prefill_speedup']:>5.2f}x {r['decode_tps']:>9.2f} "
                  f"{r['decode_speedup']:>5.2f}x {r['batch_decode_tps']:>9.2f} {r['batch_decode_speedup']:>5.2f}x "
                  f"{r['kv_bytes'] / 2**20:>11.1f} {r['kv_reduction']:>5.1f}x")
    dump_json({"args": vars(args), "results": {str(c): row for c, row in results.items()}}, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
