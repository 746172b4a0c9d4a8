"""The project tokenizer: a byte-level BPE (Hugging Face ``tokenizers``) saved as ``tokenizer.json``.

Its own module, below every stage: ``prepare`` trains it, the model's ``init`` sizes the vocabulary
from it, the engine, server and applications load it (a checkpoint's own ``tokenizer.json``, r1kit's
or another project's, loads the same way).

Byte-level means every string encodes and ``decode(encode(x)) == x``. The special tokens are the
ones the chat template and reasoning format need. This module must never write a non-standard
file: model directories load it with ``tokenizers.Tokenizer.from_file``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Iterable

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from r1kit.errors import CheckpointError

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SYSTEM, USER, ASSISTANT = "<|system|>", "<|user|>", "<|assistant|>"
THINK, END_THINK = "<think>", "</think>"
# Order fixes the ids of a trained tokenizer: <|bos|> = 0, <|eos|> = 1, <|pad|> = 2, ...
SPECIAL_TOKENS = (BOS, EOS, PAD, SYSTEM, USER, ASSISTANT, THINK, END_THINK)


def new_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE with the project's pre-tokenizer and decoder."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train on ``texts`` (streamed) to ``vocab_size`` entries, special tokens first."""
    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever unknown
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def with_special_tokens(tok: Tokenizer) -> Tokenizer:
    """Add whichever of ``SPECIAL_TOKENS`` an existing tokenizer lacks (they get new ids at the end)."""
    missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
    if missing:
        tok.add_special_tokens(missing)
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load ``tokenizer.json`` from a file or from a directory that holds one."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(
            f"no tokenizer at {file}; run `r1kit prepare` to train one, or pass the path of an existing tokenizer.json"
        )
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed files
        raise CheckpointError(f"{file} is not a valid tokenizer.json: {exc}") from None


@lru_cache(maxsize=2)
def cached_tokenizer(path: str) -> Tokenizer:
    """The tokenizer at ``path``, loaded once per worker process."""
    return Tokenizer.from_file(path)


def _encode(texts: list[str], tokenizer_path: str) -> list:
    tok = cached_tokenizer(tokenizer_path)
    # encode_batch_fast (tokenizers >= 0.21) skips computing character offsets, which we never use
    return getattr(tok, "encode_batch_fast", tok.encode_batch)(texts, add_special_tokens=False)


def encode_chunk(texts: list[str], tokenizer_path: str) -> list[np.ndarray]:
    """Token ids of a chunk of texts, as uint32 arrays; a worker task."""
    return [np.asarray(e.ids, dtype=np.uint32) for e in _encode(texts, tokenizer_path)]
