"""The shards stage of `r1kit prepare`: token ids packed into fixed-size binary files, and the reader training uses.

Layout of a shard folder: ``index.json`` (dtype, vocabulary size, and per split the shard files and
every document's id, offset and token count) and ``<split>-NNNNN.bin`` files of raw little-endian
uint16 (vocabulary <= 65536) or uint32 ids. A split is one token stream cut into shards of
``shard_tokens``; documents run across shard boundaries. This module must never load a split into
memory: the reader memory-maps the shards and copies only the block it returns.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from r1kit.data.records import AtomicWriter, read_json, write_json
from r1kit.errors import CheckpointError

FORMAT = "r1kit-shards-v1"
INDEX = "index.json"
SPLITS = ("train", "val")


def dtype_for(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every token id."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def split_of(doc_id: str, seed: int, val_fraction: float) -> str:
    """``train`` or ``val`` for a document, by a hash of its id: stable whatever the order or workers."""
    digest = hashlib.blake2b(f"{seed}:{doc_id}".encode(), digest_size=8).digest()
    return "val" if int.from_bytes(digest, "little") / 2**64 < val_fraction else "train"


class ShardWriter:
    """Append documents' token ids to one split; every full shard is written atomically."""

    def __init__(self, directory: str | Path, split: str, shard_tokens: int, dtype: np.dtype):
        self.directory, self.split, self.dtype = Path(directory), split, np.dtype(dtype)
        self.buffer = np.empty(shard_tokens, dtype=self.dtype)
        self.fill = 0
        self.shards: list[dict[str, Any]] = []
        self.ids: list[str] = []
        self.offsets: list[int] = []
        self.counts: list[int] = []
        self.total = 0

    def add(self, doc_id: str, tokens: np.ndarray) -> None:
        """Append one document (its ids already framed with BOS/EOS by the caller)."""
        tokens = np.asarray(tokens)
        if tokens.size and int(tokens.max()) > np.iinfo(self.dtype).max:
            raise ValueError(f"token id {int(tokens.max())} does not fit {self.dtype}")
        self.ids.append(doc_id)
        self.offsets.append(self.total)
        self.counts.append(int(tokens.size))
        self.total += int(tokens.size)
        while tokens.size:
            take = min(tokens.size, self.buffer.size - self.fill)
            self.buffer[self.fill:self.fill + take] = tokens[:take]
            self.fill += take
            tokens = tokens[take:]
            if self.fill == self.buffer.size:
                self._flush()

    def _flush(self) -> None:
        name = f"{self.split}-{len(self.shards):05d}.bin"
        with AtomicWriter(self.directory / name, "wb") as w:
            w.file.write(self.buffer[:self.fill].tobytes())
        self.shards.append({"file": name, "tokens": self.fill})
        self.fill = 0

    def state(self) -> dict[str, Any]:
        """Everything but the partial shard's tokens (``self.buffer[:self.fill]``), for a checkpoint."""
        return {"shards": self.shards, "ids": self.ids, "offsets": self.offsets, "counts": self.counts,
                "total": self.total}

    def restore(self, state: dict[str, Any], partial: np.ndarray) -> None:
        """Continue from a checkpoint: ``state()`` and the partial shard's tokens saved with it."""
        self.shards, self.ids, self.offsets, self.counts = state["shards"], state["ids"], state["offsets"], state["counts"]
        self.total = state["total"]
        self.fill = partial.size
        self.buffer[:self.fill] = partial

    def close(self) -> dict[str, Any]:
        """Write the last partial shard; return this split's entry of the index."""
        if self.fill:
            self._flush()
        return {"tokens": self.total, "documents": len(self.ids), "shards": self.shards,
                "ids": self.ids, "offsets": self.offsets, "counts": self.counts}


class ShardDataset:
    """(input, target) blocks of ``seq_len`` tokens from a split, memory-mapped.

    Block ``i`` covers tokens ``[i*seq_len, (i+1)*seq_len]`` of the split's stream (one token of
    overlap gives the last target). Iteration visits blocks in a shuffled order fixed by ``seed``
    and the epoch, and ``state_dict``/``load_state_dict`` resume exactly where a run stopped.
    """

    def __init__(self, directory: str | Path, split: str = "train", seq_len: int = 1024, seed: int = 0,
                 shuffle: bool = True):
        self.directory = Path(directory)
        index_path = self.directory / INDEX
        if not index_path.is_file():
            raise CheckpointError(f"no {INDEX} in {self.directory}; run `r1kit prepare` to write shards")
        self.index = read_json(index_path)
        if self.index.get("format") != FORMAT:
            raise CheckpointError(f"{index_path} is not an r1kit shard index (format {self.index.get('format')!r})")
        if split not in self.index["splits"]:
            raise CheckpointError(f"{index_path} has no split {split!r}; it has {sorted(self.index['splits'])}")
        if seq_len < 1:
            raise ValueError(f"seq_len={seq_len} must be positive")
        self.split, self.seq_len, self.seed, self.shuffle = split, seq_len, seed, shuffle
        entry = self.index["splits"][split]
        dtype = np.dtype(self.index["dtype"])
        self.shards = [np.memmap(self.directory / s["file"], dtype=dtype, mode="r", shape=(s["tokens"],))
                       for s in entry["shards"]]
        self.starts = np.cumsum([0] + [s["tokens"] for s in entry["shards"]])
        self.tokens = int(self.starts[-1])
        self.epoch, self.position = 0, 0
        self._order: tuple[int, np.ndarray] | None = None

    @property
    def vocab_size(self) -> int:
        return int(self.index["vocab_size"])

    def __len__(self) -> int:
        return max(0, (self.tokens - 1) // self.seq_len)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` of the split's stream as int64, across shard boundaries."""
        if not 0 <= start <= stop <= self.tokens:
            raise IndexError(f"range [{start}, {stop}) outside the split's {self.tokens} tokens")
        out = np.empty(stop - start, dtype=np.int64)
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        pos = start
        for k in range(max(first, 0), len(self.shards)):
            if pos >= stop:
                break
            lo, hi = pos - self.starts[k], min(stop, self.starts[k + 1]) - self.starts[k]
            out[pos - start:pos - start + hi - lo] = self.shards[k][lo:hi]
            pos += hi - lo
        return out

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= i < len(self):
            raise IndexError(f"block {i} outside 0..{len(self) - 1}")
        block = self.read(i * self.seq_len, (i + 1) * self.seq_len + 1)
        return block[:-1], block[1:]

    def order(self, epoch: int) -> np.ndarray:
        """The block order of an epoch: a permutation fixed by (seed, epoch), or 0..n-1 unshuffled."""
        if self._order is None or self._order[0] != epoch:
            n = len(self)
            perm = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._order = (epoch, perm)
        return self._order[1]

    def __iter__(self):
        """Yield blocks forever, epoch after epoch, from the current position (training consumes steps).

        The position lives in the dataset, not the iterator, so ``state_dict`` taken at any time
        resumes at the next unseen block.
        """
        if len(self) == 0:
            raise ValueError(f"split {self.split!r} has {self.tokens} tokens: too few for one block of {self.seq_len}")
        while True:
            order = self.order(self.epoch)
            while self.position < len(order):
                i = int(order[self.position])
                self.position += 1
                yield self[i]
            self.epoch, self.position = self.epoch + 1, 0

    def next_batch(self, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """The next ``batch_size`` blocks stacked as (inputs, targets) of shape [batch_size, seq_len]."""
        it = iter(self)
        pairs = [next(it) for _ in range(batch_size)]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])

    def state_dict(self) -> dict[str, Any]:
        return {"split": self.split, "seq_len": self.seq_len, "seed": self.seed, "epoch": self.epoch,
                "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("split", "seq_len", "seed"):
            if state[key] != getattr(self, key):
                raise ValueError(f"data-loader state has {key}={state[key]!r} but this dataset has {getattr(self, key)!r}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class ShardCheckpoint:
    """A shard folder's progress while it is written: ``checkpoint.json`` + the partial shards.

    Partial shards are numbered with the checkpoint that names them and written before it, so a
    crash at any moment leaves the previous checkpoint and its partials intact.
    """

    def __init__(self, directory: Path, fingerprint: str):
        self.directory, self.fingerprint = directory, fingerprint
        self.path = directory / "checkpoint.json"
        self.number = 0

    def load(self, writers: dict[str, ShardWriter]) -> dict[str, Any] | None:
        """Restore ``writers`` and return the saved extras, or start clean (None).

        A checkpoint that cannot be read back whole (a disk that failed under it) also starts clean:
        the stage is redone, never resumed from half a state.
        """
        try:
            saved = read_json(self.path) if self.path.is_file() else None
            if saved is not None and saved["fingerprint"] == self.fingerprint:
                partials = {split: self._read_back(split, saved["number"], saved["writers"][split], writer.dtype)
                            for split, writer in writers.items()}
                for split, writer in writers.items():  # only once every split has read back whole
                    writer.restore(saved["writers"][split], partials[split])
                self.number = saved["number"]
                return saved["extra"]
        except (OSError, ValueError, KeyError, TypeError):
            pass
        shutil.rmtree(self.directory, ignore_errors=True)
        self.directory.mkdir(parents=True)
        return None

    def save(self, writers: dict[str, ShardWriter], extra: dict[str, Any]) -> None:
        self.number += 1
        for split, writer in writers.items():
            with AtomicWriter(self._partial(split, self.number), "wb") as w:
                w.file.write(writer.buffer[:writer.fill].tobytes())
        write_json(self.path, {"fingerprint": self.fingerprint, "number": self.number, "extra": extra,
                               "writers": {s: w.state() for s, w in writers.items()}})
        for split in writers:
            self._partial(split, self.number - 1).unlink(missing_ok=True)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
        for split in SPLITS:
            self._partial(split, self.number).unlink(missing_ok=True)

    def _read_back(self, split: str, number: int, state: dict[str, Any], dtype: np.dtype) -> np.ndarray:
        """The partial shard of ``split``, once it and the split's full shards have the sizes ``state`` says."""
        for shard in state["shards"]:
            size = (self.directory / shard["file"]).stat().st_size
            if size != shard["tokens"] * dtype.itemsize:
                raise ValueError(f"{shard['file']} has {size} bytes, its checkpoint says {shard['tokens']} tokens")
        partial = np.fromfile(self._partial(split, number), dtype=dtype)
        expected = state["total"] - sum(s["tokens"] for s in state["shards"])
        if partial.size != expected:
            raise ValueError(f"partial shard {split} has {partial.size} tokens, its checkpoint says {expected}")
        return partial

    def _partial(self, split: str, number: int) -> Path:
        return self.directory / f"{split}.partial-{number}"
