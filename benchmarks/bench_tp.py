"""Benchmark: the cost of tensor-parallel inference on the CPU, 2 processes (gloo) against 1 (issue 21).

On one random r1kit model (float32 unless ``--dtype``), for each batch size it prints decode
tokens/s of the single-process engine on ``--threads`` threads and on half of them, and of
``tensor_parallel_size=2`` with half of them each (the same cores as the first), with the ratios, and
for the tensor-parallel engine where a step's time goes on rank 0: in the model's collectives
(the all-reduces after o_proj and down_proj and the embedding, the logits' gather, the Top-K
thresholds) and in the step's metadata broadcast, per decode step and as a share of it.
The engines' greedy outputs must be equal in float32 (the run stops otherwise); in lower precision the
count of differing ones is printed. Each configuration is
timed ``--repeats`` times round-robin and the best is kept (the machine is shared).

What a CPU cannot show: the case tensor parallelism is for. On GPUs each rank reads its half of
the weights from its own memory (decode is bound by that bandwidth, so two GPUs approach twice the
rate) and the collectives run over NVLink through NCCL in microseconds; here both processes share
one memory bus and a few cores, so a rank's halved weights buy little, and every collective is a
loopback TCP exchange through gloo. Rank 0's collective time also includes waiting for the slower
rank, so it measures imbalance and load from other work as well as communication. The figures are
the overhead tensor parallelism adds on a CPU, not the speed-up it gives on GPUs
(``benchmarks/cuda_check.sh`` runs a 2-GPU case where a machine has two).

Usage: python benchmarks/bench_tp.py [--hidden 512] [--layers 8] [--batch-sizes 1,8] [--new-tokens 48]
       [--threads 2] [--repeats 2] [--dtype float32] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import torch

from r1kit import LLM, SamplingParams
from r1kit.config import ModelConfig
from r1kit.device import resolve_dtype
from r1kit.model import R1kitForCausalLM

PROMPT_LEN = 32


def build_model(args) -> R1kitForCausalLM:
    torch.manual_seed(0)
    heads = args.hidden // 64
    cfg = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=heads, num_kv_heads=max(2, heads // 4),
                      intermediate_size=3 * args.hidden, max_seq_len=PROMPT_LEN + args.new_tokens + 8)  # fmt: skip
    return R1kitForCausalLM(cfg).to(device=args.device, dtype=resolve_dtype(args.dtype)).eval()


def comm_seconds(llm: LLM) -> tuple[float, float]:
    """Rank 0's seconds so far in the model's collectives and in step broadcasts (zeros for one process)."""
    workers = llm.llm_engine.workers
    return (workers.clock.seconds, workers.channel.seconds) if workers is not None else (0.0, 0.0)


def run_batch(llm: LLM, prompts: list[list[int]], new_tokens: int) -> tuple[float, int, tuple[float, float], list[list[int]]]:
    """(decode seconds, decode steps, their (collective, broadcast) seconds, outputs): from the step after
    every request has its first token to the last step."""
    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    outputs: dict[str, list[int]] = {}
    started, steps, marks = None, 0, (0.0, 0.0)
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out.outputs[0].token_ids
        if started is None and all(s.num_output_tokens >= 1 for r in engine.requests.values() for s in r.seqs):
            started, marks = time.perf_counter(), comm_seconds(llm)  # decode steps only from here on
        elif started is not None:
            steps += 1
    elapsed = time.perf_counter() - started
    comm = tuple(now - then for now, then in zip(comm_seconds(llm), marks))
    return elapsed, steps, comm, [outputs[str(i)] for i in range(len(prompts))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2, help="cores for the one process; each of the two gets half (at least 1)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    batches = [int(b) for b in args.batch_sizes.split(",")]
    model = build_model(args)
    print(f"model: hidden {args.hidden}, {args.layers} layers, {model.config.num_heads} heads ({model.config.num_kv_heads} K/V), "
          f"vocab {args.vocab}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {args.dtype}; "
          f"prompt {PROMPT_LEN}, {args.new_tokens} new tokens; torch {torch.__version__}")
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, args.vocab, (max(batches), PROMPT_LEN), generator=g).tolist()
    half = max(1, args.threads // 2)
    # (processes, threads each): the one process on every core, the one process on a rank's share, the two ranks
    configs = [(1, args.threads), (1, half), (2, half)] if half != args.threads else [(1, half), (2, half)]
    engines = {}
    for size, threads in configs:
        torch.set_num_threads(threads)  # the workers take the thread count of the process that starts them
        engines[size, threads] = LLM(model, tensor_parallel_size=size, max_num_seqs=max(batches))
    tp = (2, half)
    for b in batches:
        best: dict[tuple[int, int], tuple] = {}
        for _ in range(args.repeats):
            for (size, threads), llm in engines.items():
                torch.set_num_threads(threads)
                result = run_batch(llm, prompts[:b], args.new_tokens)
                if (size, threads) not in best or result[0] < best[size, threads][0]:
                    best[size, threads] = result
        differ = sum(o != t for key, result in best.items() if key != tp for o, t in zip(result[3], best[tp][3]))
        if differ and model.dtype == torch.float32:
            raise SystemExit(f"batch {b}: {differ} greedy outputs of the single process differ from the tensor-parallel engine's")
        rates = {key: b * steps / seconds for key, (seconds, steps, _, _) in best.items()}
        line = " | ".join(f"{size} process{'es' if size > 1 else ''} x {threads} thread{'s' if threads > 1 else ''} {rate:7.1f}"
                          for (size, threads), rate in rates.items())
        ratios = ", ".join(f"vs {size}x{threads} {rates[tp] / rate:.2f}x" for (size, threads), rate in rates.items() if (size, threads) != tp)
        print(f"batch {b:3d}: decode tokens/s {line}; tensor-parallel ratio {ratios}")
        seconds, steps, (collective, broadcast), _ = best[tp]
        launch = " (kernel launches only: NCCL runs asynchronously)" if model.device.type == "cuda" else ""
        print(f"           tensor-parallel decode step {1e3 * seconds / steps:.2f} ms on rank 0: collectives {1e3 * collective / steps:.2f} ms "
              f"({100 * collective / seconds:.0f}%){launch}, step broadcast {1e3 * broadcast / steps:.3f} ms ({100 * broadcast / seconds:.1f}%); "
              f"greedy outputs differing from the single process: {differ}")
    for llm in engines.values():
        llm.close()

if __name__ == "__main__":
    main()
