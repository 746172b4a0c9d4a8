"""Benchmark: the fused Triton kernels of ``r1kit.fused`` against the eager PyTorch they replace (issue 21).

Per operation, on the same random inputs, timed with ``triton.testing.do_bench`` (median), forward
alone and forward + backward (gradients of every input and weight):

* ``add+rmsnorm``: ``h = x + delta; rmsnorm(h)·w`` (the model's ``RMSNorm``) vs one fused pass;
* ``add+layernorm``: ``h = x + delta; layer_norm(h)`` vs one fused pass;
* ``swiglu``: ``silu(gate)·up`` vs one fused pass;
* ``up+gelu``: ``gelu(x·Wᵀ)`` (cuBLAS, then the activation) vs the Triton matmul with the GELU epilogue;

then a whole model's training step (forward + backward, ``--layers`` layers of ``--hidden``) with and
without :func:`r1kit.fused.apply_fused_kernels`, for RMSNorm+SwiGLU and LayerNorm+GELU models. Each
line prints eager and fused milliseconds and their ratio (eager / fused: above 1 the fused is faster),
and the largest difference between the two results.

Needs a CUDA GPU and triton; elsewhere it says so and exits 0. Usage:
    python benchmarks/bench_fused.py [--tokens 16,8192] [--hidden 4096] [--ffn 11008] [--dtype bfloat16] [--layers 4]
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
import torch.nn.functional as F

from r1kit.config import ModelConfig
from r1kit.model import R1kitForCausalLM
from r1kit.model.transformer import RMSNorm


def fwd_bwd(fn, inputs):
    """A closure running ``fn`` forward and backward on fresh leaves of ``inputs`` (grads dropped each call)."""
    leaves = [t.detach().requires_grad_(True) for t in inputs]

    def run():
        for t in leaves:
            t.grad = None
        out = fn(*leaves)
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward([o for o in outs if o is not None], [torch.ones_like(o) for o in outs if o is not None])

    return run


def first(out):
    return out[0] if isinstance(out, tuple) else out


def operations(tokens: int, hidden: int, ffn: int, dtype: torch.dtype):
    """(name, eager fn, fused fn, inputs) for each fused operation at this size."""
    from r1kit.fused.linear_gelu import linear_gelu
    from r1kit.fused.residual_norm import add_norm
    from r1kit.fused.swiglu import swiglu

    dev = "cuda"
    x, delta = torch.randn(tokens, hidden, device=dev, dtype=dtype), torch.randn(tokens, hidden, device=dev, dtype=dtype)
    w, b = torch.randn(hidden, device=dev, dtype=dtype), torch.randn(hidden, device=dev, dtype=dtype)
    gate, up = torch.randn(tokens, ffn, device=dev, dtype=dtype), torch.randn(tokens, ffn, device=dev, dtype=dtype)
    w_up = torch.randn(ffn, hidden, device=dev, dtype=dtype) * hidden**-0.5
    rms = RMSNorm(hidden, 1e-6).to(dev, dtype)

    def eager_rms(x, delta, w):  # the model's RMSNorm, with w as its weight
        h = x + delta
        return torch.func.functional_call(rms, {"weight": w}, (h,)), h

    def eager_ln(x, delta, w, b):
        h = x + delta
        return F.layer_norm(h, (hidden,), w, b, 1e-5), h

    return [
        ("add+rmsnorm", eager_rms, lambda x, d, w: add_norm(x, d, w, None, 1e-6, True), [x, delta, w]),
        ("add+layernorm", eager_ln, lambda x, d, w, b: add_norm(x, d, w, b, 1e-5, False), [x, delta, w, b]),
        ("swiglu", lambda g, u: F.silu(g) * u, swiglu, [gate, up]),
        ("up+gelu", lambda x, w: F.gelu(F.linear(x, w), approximate="tanh"), linear_gelu, [x, w_up]),
    ]


def model_step(model, tokens):
    def run():
        model.zero_grad(set_to_none=True)
        model(tokens).float().logsumexp(-1).mean().backward()

    return run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default="16,8192", help="rows per operation (a decode batch, a training micro-batch)")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--ffn", type=int, default=11008)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--layers", type=int, default=4, help="layers of the whole-model step (0 skips it)")
    ap.add_argument("--seq", type=int, default=2048)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_fused.py needs a CUDA GPU (the fused kernels are Triton GPU kernels); nothing measured here.")
        return 0
    import triton.testing

    from r1kit.fused import apply_fused_kernels

    dtype = getattr(torch, args.dtype)
    print(f"{torch.cuda.get_device_name()} | {args.dtype} | hidden {args.hidden} | ffn {args.ffn}")
    print(f"{'op':<14} {'tokens':>6} {'pass':<8} {'eager ms':>9} {'fused ms':>9} {'eager/fused':>11} {'max |Δ|':>9}")
    for tokens in (int(t) for t in args.tokens.split(",")):
        for name, eager, fused, inputs in operations(tokens, args.hidden, args.ffn, dtype):
            with torch.no_grad():
                diff = float((first(eager(*inputs)).float() - first(fused(*inputs)).float()).abs().max())
                t_eager = triton.testing.do_bench(lambda: eager(*inputs))
                t_fused = triton.testing.do_bench(lambda: fused(*inputs))
            print(f"{name:<14} {tokens:>6} {'forward':<8} {t_eager:>9.4f} {t_fused:>9.4f} {t_eager / t_fused:>11.2f} {diff:>9.2e}")
            t_eager = triton.testing.do_bench(fwd_bwd(eager, inputs))
            t_fused = triton.testing.do_bench(fwd_bwd(fused, inputs))
            print(f"{name:<14} {tokens:>6} {'fwd+bwd':<8} {t_eager:>9.4f} {t_fused:>9.4f} {t_eager / t_fused:>11.2f}")
    if args.layers:
        heads = max(1, args.hidden // 128)
        for kind, overrides in (("rmsnorm+swiglu", {}), ("layernorm+gelu", {"norm": "layernorm", "activation": "gelu"})):
            cfg = ModelConfig(vocab_size=32000, hidden_size=args.hidden, num_layers=args.layers, num_heads=heads, num_kv_heads=heads,
                              intermediate_size=args.ffn, max_seq_len=args.seq, dropout=0.0, **overrides)
            torch.manual_seed(0)
            model = R1kitForCausalLM(cfg).to("cuda", dtype)
            fused = copy.deepcopy(model)
            swapped = apply_fused_kernels(fused)
            batch = torch.randint(0, cfg.vocab_size, (1, args.seq), device="cuda")
            with torch.no_grad():
                diff = float((model(batch).float() - fused(batch).float()).abs().max())
            t_eager = triton.testing.do_bench(model_step(model, batch))
            t_fused = triton.testing.do_bench(model_step(fused, batch))
            print(f"model step {kind} ({args.layers} layers, {args.seq} tokens, {swapped} layers swapped): eager {t_eager:.2f} ms, "
                  f"fused {t_fused:.2f} ms, eager/fused {t_eager / t_fused:.2f}, logits max |Δ| {diff:.2e}")
            del model, fused
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
