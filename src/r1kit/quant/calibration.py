"""Calibration samples for GPTQ: ``nsamples`` windows of ``seqlen`` token ids, drawn reproducibly.

From r1kit token shards (a directory with ``index.json``, the ``train`` split, or ``val`` when
asked) or from a text file tokenized with the model's own ``tokenizer.json``. The same seed gives
the same samples. This module must never load a whole shard split into memory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from r1kit.errors import ConfigError


def load_calibration(source: str | Path, model_dir: str | Path, nsamples: int, seqlen: int, seed: int = 0,
                     split: str = "train") -> torch.Tensor:
    """Token ids [n, seqlen] (n = nsamples, or fewer when the data holds fewer distinct windows)."""
    if nsamples < 1 or seqlen < 1:
        raise ConfigError(f"nsamples={nsamples} and seqlen={seqlen} must be positive")
    source = Path(source)
    if source.is_dir():
        return from_shards(source, nsamples, seqlen, seed, split)
    if source.is_file():
        return from_text(source, model_dir, nsamples, seqlen, seed)
    raise ConfigError(f"--calib {source} does not exist: give an r1kit shard directory (with index.json) or a text file")


def from_shards(directory: Path, nsamples: int, seqlen: int, seed: int, split: str = "train") -> torch.Tensor:
    from r1kit.data.shards import ShardDataset

    data = ShardDataset(directory, split=split, seq_len=seqlen, seed=seed, shuffle=True)
    if len(data) == 0:
        raise ConfigError(f"{directory} split {split!r} has {data.tokens} tokens: too few for one calibration sample of {seqlen}")
    order = data.order(0)[:nsamples]
    return torch.from_numpy(np.stack([data[int(i)][0] for i in order])).long()


def from_text(file: Path, model_dir: str | Path, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    from r1kit.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    ids = np.asarray(tokenizer.encode(file.read_text(encoding="utf-8", errors="replace")).ids, dtype=np.int64)
    if ids.size < seqlen:
        raise ConfigError(f"{file} tokenizes to {ids.size} tokens: too few for one calibration sample of {seqlen}; give more text or a smaller --seqlen")
    starts = np.random.default_rng(seed).integers(0, ids.size - seqlen + 1, size=nsamples)  # random windows, as the reference
    return torch.from_numpy(np.stack([ids[s : s + seqlen] for s in starts]))
