"""Benchmark: one attention layer's forward on CPU — global SDPA vs local and hybrid (issue 2).

Runs the real :class:`r1kit.model.attention.Attention` module (hidden 512, 8 heads, 4 KV heads,
batch 1, float32, ``torch.inference_mode``) at several lengths and prints, per length, the median
forward time and the peak memory of each variant with its ratio to global SDPA measured in the same
run. It must never change the model: every variant is a ``ModelConfig`` choice.

How it measures
* Time: all variants of one length are built in this process with the same Q/K/V/O weights, warmed
  up once, then timed round-robin (variant A, B, C, ... A, B, C, ...) for ``--repeats`` rounds; the
  median is reported. Round-robin keeps the ratios honest on a machine whose speed drifts.
* Peak memory: torch allocates outside ``tracemalloc``'s view, so each (length, variant) runs once
  more in a fresh subprocess: the process's peak resident set (``VmHWM``) is reset through
  ``/proc/self/clear_refs`` after inputs, weights and a short warm-up exist, and the figure is the
  peak reached during one forward minus the resident set before it, i.e. everything the forward
  touched at its high point (activations, score blocks, masks, library workspaces).
* ``proj only`` is the part every variant shares (Q/K/V/O projections and RoPE, no attention), so
  "forward − proj only" is the attention kernel itself.

Usage: python benchmarks/bench_attention.py [--lengths 1024,4096,16384] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from r1kit.config import ModelConfig
from r1kit.model.attention import Attention
from r1kit.model.rope import RotaryEmbedding, apply_rotary

HIDDEN, HEADS, KV_HEADS = 512, 8, 4


@dataclass(frozen=True)
class Variant:
    name: str
    kind: str  # attention kind of the layer
    window: int
    fields: tuple[tuple[str, object], ...] = ()  # extra ModelConfig fields
    hard_gate: bool = False  # bias the gate so --skip of the tokens clear the threshold


VARIANTS = (
    Variant("global (SDPA)", "global", 256),
    Variant("local w=256", "local", 256),
    Variant("local w=4096", "local", 4096),
    Variant("hybrid full", "hybrid", 256),
    Variant("hybrid compressed", "hybrid", 256, (("hybrid_global", "compressed"),)),
    Variant("hybrid hard gate", "hybrid", 256, (("hybrid_gate_threshold", 0.5),), hard_gate=True),
    Variant("proj only", "global", 256),
)
BY_NAME = {v.name: v for v in VARIANTS}


def build(variant: Variant, n: int, skip: float) -> tuple[Attention, torch.Tensor, torch.Tensor, torch.Tensor, float | None]:
    """The layer, its input, RoPE tables, and (hard gate only) the share of tokens that skip global."""
    config = ModelConfig(
        vocab_size=32,
        hidden_size=HIDDEN,
        num_layers=1,
        num_heads=HEADS,
        num_kv_heads=KV_HEADS,
        intermediate_size=4 * HIDDEN,
        attention=variant.kind,
        max_seq_len=max(n, 4096),
        **dict(variant.fields),
    )
    torch.manual_seed(0)  # same Q/K/V/O weights (created first) and same input for every variant
    layer = Attention(config, 0).eval()
    x = torch.randn(1, n, HIDDEN)
    cos, sin = RotaryEmbedding(config)(torch.arange(n), torch.float32)
    skipped = None
    if variant.hard_gate:
        with torch.inference_mode():
            logits = layer.gate(x).flatten()
            # shift the last bias so that a `skip` share of tokens lands above the threshold's logit
            threshold = config.hybrid_gate_threshold
            shift = torch.logit(torch.tensor(threshold)) - torch.quantile(logits, 1.0 - skip)
            layer.gate[-1].bias.add_(shift + 1e-4)
            skipped = float((torch.sigmoid(layer.gate(x)) >= threshold).float().mean())
    return layer, x, cos, sin, skipped


def step(variant: Variant, layer: Attention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    if variant.name != "proj only":
        return lambda: layer(x, cos, sin, variant.window)

    def projections_only():  # Attention.forward without the attention call
        b, m, _ = x.shape
        q = layer.q_proj(x).view(b, m, HEADS, -1).transpose(1, 2)
        k = layer.k_proj(x).view(b, m, KV_HEADS, -1).transpose(1, 2)
        layer.v_proj(x)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return layer.o_proj(q.transpose(1, 2).reshape(b, m, -1))

    return projections_only


# -- peak memory: one forward in a fresh process ------------------------------------------------


def _kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", open("/proc/self/status").read(), re.MULTILINE).group(1))


def measure_memory(name: str, n: int, skip: float, threads: int) -> None:
    """Child process: print {"peak_mib": ...} for one forward of one variant at length n."""
    torch.set_num_threads(threads)
    variant = BY_NAME[name]
    layer, x, cos, sin, _ = build(variant, n, skip)
    with torch.inference_mode():
        warm = min(n, 512)  # load kernels and thread pools on a short input first
        step(variant, layer, x[:, :warm], cos[:warm], sin[:warm])()
        fn = step(variant, layer, x, cos, sin)
        before = _kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set
        out = fn()
        peak = _kib("VmHWM")
        del out
    print(json.dumps({"peak_mib": (peak - before) / 1024}))


def peak_memory(name: str, n: int, skip: float, threads: int) -> float | None:
    cmd = [sys.executable, __file__, "--memory-case", name, "--lengths", str(n), "--skip", str(skip), "--threads", str(threads)]
    run = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if run.returncode != 0:
        print(f"  memory run for {name} at n={n} failed:\n{run.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(run.stdout.strip().splitlines()[-1])["peak_mib"]


# -- timing: all variants of one length, round-robin --------------------------------------------


def time_length(names: list[str], n: int, repeats: int, skip: float) -> tuple[dict[str, tuple[float, float]], float | None]:
    cases, skipped = {}, None
    for name in names:
        variant = BY_NAME[name]
        layer, x, cos, sin, frac = build(variant, n, skip)
        skipped = frac if frac is not None else skipped
        cases[name] = step(variant, layer, x, cos, sin)
    times: dict[str, list[float]] = {name: [] for name in names}
    with torch.inference_mode():
        for fn in cases.values():
            fn()  # warm-up
        for _ in range(repeats):
            for name, fn in cases.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(ts), min(ts)) for name, ts in times.items()}, skipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="1024,4096,16384", help="comma-separated sequence lengths (drop 16384 for a quick run)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after one warm-up; the median is reported")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads (default: torch's)")
    all_names = ", ".join(v.name for v in VARIANTS)
    parser.add_argument("--variants", default=",".join(v.name for v in VARIANTS), help=f"comma-separated subset of: {all_names}")
    parser.add_argument("--skip", type=float, default=0.8, help="share of tokens the hard gate sends to local only (default 0.8)")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-case subprocesses that measure peak memory")
    parser.add_argument("--memory-case", help=argparse.SUPPRESS)  # internal: child process for one case
    args = parser.parse_args()
    lengths = [int(s) for s in args.lengths.split(",")]
    if args.memory_case:
        measure_memory(args.memory_case, lengths[0], args.skip, args.threads)
        return
    names = [s.strip() for s in args.variants.split(",")]
    unknown = [s for s in names if s not in BY_NAME]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {list(BY_NAME)}")
    if "global (SDPA)" not in names:
        names.insert(0, "global (SDPA)")  # the baseline every ratio refers to
    torch.set_num_threads(args.threads)

    print(f"# attention forward, one layer: hidden {HIDDEN}, {HEADS} heads, {KV_HEADS} KV heads, head_dim {HIDDEN // HEADS}, batch 1, float32, CPU")
    print(
        f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, repeats {args.repeats} (median), "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    print("# speed-up = global time / variant time (medians); attention-only = forward − 'proj only' (the Q/K/V/O projections")
    print("# and RoPE every variant shares); memory = peak RSS growth during one forward in a fresh process\n")
    print(
        "| n | variant | forward ms (median) | best ms | speed-up vs global | attention-only ms | attention-only speed-up "
        "| peak MiB | memory vs global |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    skipped_at = {}
    for n in lengths:
        times, skipped = time_length(names, n, args.repeats, args.skip)
        skipped_at[n] = skipped
        memory = {name: (None if args.no_memory else peak_memory(name, n, args.skip, args.threads)) for name in names}
        base_t, base_m = times["global (SDPA)"][0], memory["global (SDPA)"]
        proj = times["proj only"][0] if "proj only" in times else None
        for name in names:
            mem, (t, best) = memory[name], times[name]
            mem_s = "-" if mem is None else f"{mem:.1f}"
            mem_r = "-" if mem is None or not base_m else f"{mem / base_m:.2f}×"
            own = "-" if proj is None or name == "proj only" else f"{(t - proj) * 1e3:.1f}"
            own_r = "-" if proj is None or name == "proj only" or t <= proj else f"{(base_t - proj) / (t - proj):.2f}×"
            print(f"| {n} | {name} | {t * 1e3:.1f} | {best * 1e3:.1f} | {base_t / t:.2f}× | {own} | {own_r} | {mem_s} | {mem_r} |", flush=True)
    if any(v is not None for v in skipped_at.values()):
        shares = ", ".join(f"n={n}: {s:.1%}" for n, s in skipped_at.items() if s is not None)
        print(f"\n# hard gate (threshold 0.5): share of tokens skipping the global branch: {shares}")


if __name__ == "__main__":
    main()
