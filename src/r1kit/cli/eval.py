"""`r1kit eval ppl`: perplexity of a model on token shards or a text file, overall and by position
(:mod:`r1kit.evaluate`)."""

from __future__ import annotations

import argparse
import json

import torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", choices=["ppl"], help="what to evaluate: ppl (perplexity)")
    parser.add_argument("--model", required=True, help="model directory, .gguf file or pulled model name")
    parser.add_argument("--data", required=True, help="a shard folder of `r1kit prepare` (its val split) or a text file")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per evaluated block (default 512)")
    parser.add_argument("--max-blocks", type=int, default=64, help="most blocks to evaluate (default 64)")
    parser.add_argument("--buckets", type=int, default=4, help="position buckets for the per-position perplexity (default 4)")
    parser.add_argument("--batch-size", type=int, default=4, help="blocks per forward (default 4)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    from r1kit.checkpoints.load import load_model, resolve_model
    from r1kit.evaluate import blocks_from, perplexity

    folder = resolve_model(args.model)
    model = load_model(folder, dtype=torch.float32)
    result = perplexity(model, blocks_from(args.data, folder, args.seq_len, args.max_blocks), args.buckets, args.batch_size)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"perplexity {result['ppl']:.3f} (loss {result['loss']:.4f}) over {result['blocks']} blocks of {result['seq_len']} tokens")
        for b in result["by_position"]:
            print(f"  positions {b['from']:>6}-{b['to']:<6} perplexity {b['ppl']:.3f}")
    return 0
