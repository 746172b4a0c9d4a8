"""Perplexity of a model, overall and by position bucket, on token shards or a text file.

Perplexity by position bucket shows whether a model uses long context (it should fall with position)
and is how the long-context comparisons of hybrid and global attention are read. ``r1kit eval ppl``,
the quickstart and the benchmarks use these functions.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from r1kit.errors import ConfigError


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
    from r1kit.tokenizer import load_tokenizer

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
