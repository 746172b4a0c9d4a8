"""`r1kit plan`: the memory a model needs (weights, KV cache, training) and the layout for given devices.

A thin shell over :mod:`r1kit.plan`; it reads the model's config only, so it runs anywhere in a moment.
"""

from __future__ import annotations

import argparse
import json

from r1kit.config import dump_json
from r1kit.errors import ConfigError

WEIGHTS = ("none", "int8", "int4")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from r1kit.plan.devices import choices

    parser.add_argument("--model", required=True, help="model directory, .gguf, pulled name, or a config (.yaml of model fields, .json)")
    parser.add_argument("--gpus", required=True, help=f"N x DEVICE (e.g. 2xA100-80G, 4xH100-80G) or cpu; devices: {choices()}")
    parser.add_argument("--context", type=int, default=4096, help="tokens per sequence, served and trained (default 4096)")
    parser.add_argument("--batch", type=int, default=16, help="sequences served at once (default 16)")
    parser.add_argument("--micro-batch", type=int, default=1, help="training sequences per micro-batch on each data-parallel rank (default 1)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="dtype of the float weights and the KV cache (auto: the checkpoint's)")
    parser.add_argument("--quant", default=None, choices=WEIGHTS, help="serving weights: none, int8 or int4 GPTQ (default: the checkpoint's)")
    parser.add_argument("--group-size", type=int, default=None, help="GPTQ group size (default: the checkpoint's, else 128)")
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "fp16"), help="training precision (default bf16)")
    parser.add_argument("--block-size", type=int, default=16, help="the engine's KV block size (default 16)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048, help="the engine's tokens per step (default 2048)")
    parser.add_argument("--utilization", type=float, default=0.9, help="share of each device's memory a plan may use (default 0.9)")
    parser.add_argument("--json", nargs="?", const="-", metavar="FILE", help="print the plan as JSON, or write it to FILE")


def run(args: argparse.Namespace) -> int:
    from r1kit.plan import Workload, make_plan
    from r1kit.plan.devices import parse_gpus
    from r1kit.plan.report import render
    from r1kit.plan.source import read_model

    devices = parse_gpus(args.gpus)  # a bad --gpus fails before the model is read
    for name in ("context", "batch", "micro_batch", "block_size", "max_num_batched_tokens"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')}={getattr(args, name)} must be a positive integer")
    if not 0 < args.utilization <= 1:
        raise ConfigError(f"--utilization={args.utilization} must be in (0, 1]")
    source = read_model(args.model)
    quant = source.quant
    dtype = source.config.torch_dtype if args.dtype == "auto" else args.dtype
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"the checkpoint's torch_dtype={dtype!r} is not float32, bfloat16 or float16; pass --dtype")
    if args.quant is None:
        weights = f"int{quant.bits}" if quant is not None else dtype
    else:
        weights = dtype if args.quant == "none" else args.quant
    group = args.group_size or (quant.group_size if quant is not None else 128)
    if group < 1 and group != -1:
        raise ConfigError(f"--group-size={group} must be positive, or -1 for one group per output channel")
    if args.context > source.config.max_seq_len:
        raise ConfigError(f"--context={args.context} exceeds the model's max_seq_len={source.config.max_seq_len}; give a shorter context")
    work = Workload(context=args.context, batch=args.batch, micro_batch=args.micro_batch, dtype=dtype, weights=weights,
                    precision=args.precision, group_size=group, block_size=args.block_size, max_chunk=args.max_num_batched_tokens,
                    utilization=args.utilization)
    plan = make_plan(source, devices, work)
    if args.json == "-":
        print(json.dumps(plan, indent=2))
    else:
        print(render(plan))
        if args.json:
            dump_json(plan, args.json)
            print(f"wrote {args.json}")
    return 0
