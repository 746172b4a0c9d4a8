"""Benchmark: one FFN decode step (batch 1, one token) — Top-K gather path vs the dense FFN (issue 2).

For each size and dtype it builds a :class:`DenseFFN` and, on the same weights, a :class:`TopKFFN`
per sparsity, then times one decode step of each under ``torch.inference_mode``:

* ``dense``: ``DenseFFN.forward`` (reads all of W_gate, W_up, W_down);
* ``gather``: ``TopKFFN.forward_gather``, the decode path (reads all of W_gate to rank the neurons,
  then only the k kept rows of W_up and of the row-major W_downᵀ copy);
* ``masked``: ``TopKFFN.forward_masked``, the training/prefill path, for reference (dense work).

All variants of one size and dtype are timed round-robin (dense, gather 0, gather 0.3, ..., dense,
...) for ``--repeats`` rounds after a warm-up, and the median is reported, so the ratios hold even
on a machine whose speed drifts. As gpt-fast does, it prints achieved memory bandwidth: bytes of
weights the step must read divided by its time. A decode step is memory-bound, so this is the figure
to hold against the machine's read bandwidth (printed first: best ``torch.sum`` over 512 MiB).
The benchmark must never change the model; it only calls its public forward paths.

Usage: python benchmarks/bench_ffn_decode.py [--sizes 2048x5632,1536x8960] [--dtypes float32,bfloat16]
       [--sparsities 0,0.3,0.6,0.8] [--repeats 50] [--threads N] [--no-masked]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from r1kit.config import ModelConfig
from r1kit.model.ffn import DenseFFN, TopKFFN


def config(hidden: int, ffn: int, sparsity: float) -> ModelConfig:
    return ModelConfig(
        vocab_size=32, hidden_size=hidden, num_layers=1, num_heads=hidden // 128, intermediate_size=ffn, ffn="topk", topk_sparsity=sparsity
    )


def read_bandwidth(repeats: int = 5) -> float:
    """GB/s of a plain streaming read (sum over a 512 MiB float32 tensor, best of ``repeats``): the decode roofline."""
    big = torch.ones(128 * 1024 * 1024)
    with torch.inference_mode():
        big.sum()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            big.sum()
            times.append(time.perf_counter() - start)
    return big.numel() * 4 / min(times) / 1e9


def bench_case(hidden: int, ffn: int, dtype: torch.dtype, sparsities: list[float], repeats: int, masked: bool) -> list[dict]:
    torch.manual_seed(0)
    dense = DenseFFN(config(hidden, ffn, 0.0)).to(dtype).eval()
    # Built outside inference mode: TopKFFN caches W_downᵀ keyed on the weight's version counter,
    # which inference tensors do not have.
    sparse = {}
    for s in sparsities:
        layer = TopKFFN(config(hidden, ffn, s)).to(dtype).eval()
        layer.load_state_dict(dense.state_dict())
        sparse[s] = layer
    x = torch.randn(1, 1, hidden, dtype=dtype)
    size = x.element_size()
    full_bytes = 3 * hidden * ffn * size
    cases = {("dense", None): (dense.forward, full_bytes, ffn)}
    for s, layer in sparse.items():
        cases[("gather", s)] = (layer.forward_gather, (hidden * ffn + 2 * layer.k * hidden) * size, layer.k)
    if masked:
        for s, layer in sparse.items():
            cases[("masked", s)] = (layer.forward_masked, full_bytes, layer.k)

    times: dict[tuple, list[float]] = {key: [] for key in cases}
    with torch.inference_mode():
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        for s, layer in sparse.items():  # the benchmark is void if the fast path is wrong
            got, want = layer.forward_gather(x).float(), layer.forward_masked(x).float()
            err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
            if err > tol:
                print(f"WARNING: gather and masked differ at sparsity {s}: max relative error {err:.1e}")
        for fn, _, _ in cases.values():
            for _ in range(3):
                fn(x)
        for _ in range(repeats):
            for key, (fn, _, _) in cases.items():
                start = time.perf_counter()
                fn(x)
                times[key].append(time.perf_counter() - start)
    rows = []
    dense_t = statistics.median(times[("dense", None)])
    for (path, s), (_, nbytes, k) in cases.items():
        t = statistics.median(times[(path, s)])
        best = min(times[(path, s)])
        rows.append(
            {"path": path, "sparsity": s, "k": k, "ms": t * 1e3, "best_ms": best * 1e3, "speedup": dense_t / t}
            | {"mb": nbytes / 1e6, "gbs": nbytes / t / 1e9}
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="2048x5632,1536x8960", help="comma-separated HIDDENxFFN sizes")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated torch dtypes")
    parser.add_argument("--sparsities", default="0,0.3,0.6,0.8", help="comma-separated Top-K sparsities (share of neurons off)")
    parser.add_argument("--repeats", type=int, default=50, help="timed rounds after a warm-up; the median is reported")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads (default: torch's)")
    parser.add_argument("--no-masked", action="store_true", help="leave out the masked (dense-compute) Top-K path")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes.split(",")]
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    sparsities = [float(s) for s in args.sparsities.split(",")]

    print("# FFN decode step (SwiGLU, batch 1, one token), CPU, torch.inference_mode")
    print(
        f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs ({platform.machine()}), "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, repeats {args.repeats} (median), "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    print(f"# streaming read bandwidth (torch.sum over 512 MiB, best of 5): {read_bandwidth():.1f} GB/s")
    print("# bytes = weights the step must read: dense/masked 3·d·f, gather d·f (W_gate, to rank) + 2·k·d (kept W_up and W_downᵀ rows)\n")
    print("| d×f | dtype | path | sparsity | k | ms/step (median) | best ms | tokens/s | speed vs dense | weight MB/step | GB/s |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for hidden, ffn in sizes:
        for dtype in dtypes:
            for r in bench_case(hidden, ffn, dtype, sparsities, args.repeats, not args.no_masked):
                s = "-" if r["sparsity"] is None else f"{r['sparsity']:g}"
                print(
                    f"| {hidden}×{ffn} | {str(dtype).removeprefix('torch.')} | {r['path']} | {s} | {r['k']} | {r['ms']:.2f} | {r['best_ms']:.2f} | "
                    f"{1e3 / r['ms']:.0f} | {r['speedup']:.2f}× | {r['mb']:.1f} | {r['gbs']:.1f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
