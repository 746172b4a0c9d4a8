"""Benchmark: the CUDA int4 GPTQ kernels (Triton) against cuBLAS float16 on the same shapes (issue 7).

For each weight shape ``KxN`` (inputs × outputs) and row count (1 = one decoding sequence), on a
random 4-bit g128 GPTQ layer (``--act-order``: with a shuffled ``g_idx``) and a float16 weight of the
same shape, it times with ``triton.testing.do_bench`` (median):

* ``fp16``: ``F.linear`` on the float16 weight (cuBLAS), the peer;
* ``int4``: :func:`r1kit.quant.triton_int4.int4_gptq_matmul` as ``QuantLinear`` calls it, reading
  ``qweight``/``qzeros``/``scales``/``g_idx`` as stored: the fused kernel up to 16 rows (its launch
  shape chosen by timing at first use, printed), dequantize + cuBLAS above;
* ``dequant``: the reference backend (dequantize with torch ops, then ``F.linear``);

and prints each one's achieved weight bandwidth (bytes of the weight it must read / time) beside the
device's copy bandwidth, the int4/fp16 speed-up, and the int4 result's largest error against the
float reference.

Needs a CUDA GPU and triton. Usage:
    python benchmarks/bench_int4_cuda.py [--shapes 4096x4096,4096x14336,14336x4096] [--rows 1,16,128] [--act-order]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from r1kit.infer.benchmark import memory_bandwidth
from r1kit.quant import packing
from r1kit.quant.int4 import triton_kernel
from r1kit.quant.int4_linear import QuantLinear


def random_layer(k: int, n: int, group_size: int, act_order: bool, device: str) -> QuantLinear:
    g = torch.Generator().manual_seed(k * 7 + n)
    groups = k // group_size
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32)
    zeros = torch.randint(1, 16, (groups, n), generator=g, dtype=torch.int32)
    scales = (torch.rand(groups, n, generator=g) * 0.02 + 0.005).half()
    g_idx = packing.default_g_idx(k, group_size)
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=g)]
    tensors = packing.pack_gptq(codes, zeros, scales, g_idx, 4)
    return QuantLinear.from_packed(tensors, k, n, group_size).to(device, torch.float16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="4096x4096,4096x14336,14336x4096,768x1280,2048x768",
                    help="comma-separated KxN weight shapes (in x out); the last two are the ~100M model's")
    ap.add_argument("--rows", default="1,16,128", help="comma-separated row counts (tokens in the product)")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--act-order", action="store_true", help="shuffled g_idx (act-order checkpoints)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_int4_cuda.py needs a CUDA GPU (and triton)")
    from triton.testing import do_bench

    from r1kit.quant.triton_int4 import SMALL_M, choose_tiles

    device = torch.device("cuda")
    copy, read = memory_bandwidth("cuda", mib=2048)
    print(f"# {torch.cuda.get_device_name(device)}, torch {torch.__version__}: copy bandwidth (read + write) {copy / 1e9:.0f} GB/s, "
          f"read {read / 1e9:.0f} GB/s; float16 activations, group size {args.group_size}{', act-order' if args.act_order else ''}")
    print("| K x N | rows | fp16 cuBLAS µs | int4 µs | int4 / fp16 speed-up | dequant + matmul µs | fp16 GB/s | int4 GB/s | "
          "int4 launch | max err / max ref |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        layer = random_layer(k, n, args.group_size, args.act_order, "cuda")
        w16 = layer.dequantized_weight(torch.float16)
        int4_bytes = sum(t.numel() * t.element_size() for t in (layer.qweight, layer.qzeros, layer.scales, layer.g_idx))
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, k, device=device, dtype=torch.float16)
            ref = F.linear(x.float(), w16.float())
            layer(x)  # the first call picks the launch shape
            if rows <= SMALL_M:
                t = choose_tiles(x, layer.qweight, layer.qzeros, layer.scales, layer.g_idx.int(), layer.zero_offset,
                                 layer.prepared(triton_kernel.prepare).group_k)
                launch = f"{t.block_m}x{t.block_n}x{t.block_k} split {t.split_k}" if t else "dequantize (no shape ran correctly)"
            else:
                launch = "dequantize + cuBLAS"
            err = float((layer(x).float() - ref).abs().max() / ref.abs().max())
            t16 = do_bench(lambda: F.linear(x, w16), warmup=25, rep=100, return_mode="median") * 1e3
            t4 = do_bench(lambda: layer(x), warmup=25, rep=100, return_mode="median") * 1e3
            tdq = do_bench(lambda: layer.forward_dequant(x), warmup=25, rep=100, return_mode="median") * 1e3
            line = (f"| {k}x{n} | {rows} | {t16:.1f} | {t4:.1f} | {t16 / t4:.2f}x | {tdq:.1f} | {w16.numel() * 2 / t16 / 1e3:.0f} | "
                    f"{int4_bytes / t4 / 1e3:.0f} | {launch} | {err:.1e} |")
            print(line, flush=True)


if __name__ == "__main__":
    main()
