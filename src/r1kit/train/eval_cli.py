"""`r1kit eval ppl`: perplexity of a model on token shards or a text file, overall and by position.

Perplexity by position bucket shows whether a model uses long context (it should fall with position)
and is how the long-context comparisons of hybrid and global attention are read.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from r1kit.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", choices=["ppl"], help="what to evaluate: ppl (perplexity)")
    parser.add_argument("--model", required=True, help="model directory, .gguf file or pulled model name")
    parser.add_argument("--data", required=True, help="a shard folder of `r1kit prepare` (its val split) or a text file")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per evaluated block (default 512)")
    parser.add_argument("--max-blocks", type=int, default=64, help="most blocks to evaluate (default 64)")
    parser.add_argument("--buckets", type=int, default=4, help="position buckets for the per-position perplexity (default 4)")
    parser.add_argument("--batch-size", type=int, default=4, help="blocks per forward (default 4)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def blocks_from(data: str, model_dir: str | Path, seq_len: int, max_blocks: int) -> np.ndarray:
    """[blocks, seq_len + 1] token ids from shards (val split) or from a text file tokenized with the model's tokenizer."""
    path = Path(data)
    if (path / "index.json").is_file():
        from r1kit.data.shards import ShardDataset

        ds = ShardDataset(path, "val", seq_len, shuffle=False)
        n = min(len(ds), max_blocks)
        return np.stack([ds.read(i * seq_len, (i + 1) * seq_len + 1) for i in range(n)]) if n else np.zeros((0, seq_len + 1), np.int64)
    if not path.is_file():
        raise ConfigError(f"--data {data}: neither a shard folder (with index.json) nor a text file")
    from r1kit.data.tokenizer import load_tokenizer

    ids = np.array(load_tokenizer(model_dir).encode(path.read_text(encoding="utf-8", errors="replace")).ids, dtype=np.int64)
    n = min((len(ids) - 1) // seq_len, max_blocks)
    return np.stack([ids[i * seq_len : (i + 1) * seq_len + 1] for i in range(n)]) if n > 0 else np.zeros((0, seq_len + 1), np.int64)


@torch.inference_mode()
def perplexity(model, blocks: np.ndarray, buckets: int, batch_size: int) -> dict:
    """Overall perplexity and perplexity of each of ``buckets`` equal position ranges."""
    if len(blocks) == 0:
        raise ConfigError("not enough tokens for one block: lower --seq-len or give more data")
    seq_len = blocks.shape[1] - 1
    losses = []
    for lo in range(0, len(blocks), batch_size):
        batch = torch.from_numpy(blocks[lo : lo + batch_size]).to(model.device)
        logits = model(batch[:, :-1])
        losses.append(F.cross_entropy(logits.float().transpose(1, 2), batch[:, 1:], reduction="none"))
    loss = torch.cat(losses).mean(0)  # per position
    edges = np.linspace(0, seq_len, buckets + 1).astype(int)
    by_position = [
        {"from": int(a), "to": int(b), "ppl": math.exp(float(loss[a:b].mean()))} for a, b in zip(edges[:-1], edges[1:]) if b > a
    ]
    return {"blocks": len(blocks), "seq_len": seq_len, "loss": float(loss.mean()), "ppl": math.exp(float(loss.mean())), "by_position": by_position}


def run(args: argparse.Namespace) -> int:
    from r1kit.checkpoints.load import load_model, resolve_model

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
