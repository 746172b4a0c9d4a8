"""The records that flow between stages (documents and drops) and their atomic JSONL files.

Stages hand each other JSON-lines files, one document per line (and, once tokenized, the documents'
token ids beside them), so that every stage streams and a finished stage's output can be reused by a
resumed run. This module must never hold a whole corpus
in memory, and never leave a half-written file under its final name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np


@dataclasses.dataclass
class Doc:
    """One document. ``id`` is stable across runs: the source plus its place inside the source."""

    id: str
    source: str
    loc: str | None
    kind: str  # "text" or "code"
    text: str
    lang: str | None = None
    augmented: bool = False

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, line: str | bytes) -> Doc:
        return cls(**json.loads(line))


@dataclasses.dataclass
class Drop:
    """A document a stage removed, with enough to find it again in the input."""

    id: str
    source: str
    loc: str | None
    stage: str
    reason: str  # a short key, counted in the report
    detail: str = ""
    duplicate_of: str | None = None

    def to_json(self) -> str:
        out = dataclasses.asdict(self)
        if self.duplicate_of is None:
            del out["duplicate_of"]
        return json.dumps(out, ensure_ascii=False)


class AtomicWriter:
    """Write a file under a temporary name and rename it into place on ``commit``.

    Used as a context manager: leaving the block by an exception deletes the temporary file, so a
    crashed stage leaves nothing that a resumed run could mistake for finished output. A commit that
    fails (a full disk often shows only at the final flush) deletes it too.
    """

    def __init__(self, path: str | Path, mode: str = "w"):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.tmp, mode, encoding=None if "b" in mode else "utf-8")

    def commit(self) -> None:
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.tmp, self.path)
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        """Close and delete the temporary file; the final name is left as it was."""
        with contextlib.suppress(OSError):  # closing retries the flush that just failed
            self.file.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> AtomicWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


class JsonlWriter(AtomicWriter):
    """Atomic JSON-lines writer of documents or drops."""

    def __init__(self, path: str | Path):
        super().__init__(path, "wb")

    def write(self, record: Doc | Drop) -> None:
        self.file.write(record.to_json().encode("utf-8") + b"\n")


def iter_docs(path: str | Path) -> Iterator[Doc]:
    """Stream the documents of a stage file, in order."""
    with open(path, "rb") as f:
        for line in f:
            yield Doc.from_json(line)


def read_at(file: Any, offset: int) -> Doc:
    """Read the document at a byte offset of an open stage file (random access for dedup checks)."""
    file.seek(offset)
    return Doc.from_json(file.readline())


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    with AtomicWriter(path) as w:
        w.file.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


class TokenWriter:
    """Token ids of a stage's documents, in the order of its ``docs.jsonl``: ``ids.bin`` (uint32)
    and ``counts.bin`` (one uint32 per document), both written atomically on leaving the block."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.ids = AtomicWriter(self.directory / "ids.bin", "wb")
        self.counts: list[int] = []

    def write(self, ids: np.ndarray) -> None:
        self.ids.file.write(np.asarray(ids, dtype="<u4").tobytes())
        self.counts.append(len(ids))

    def __enter__(self) -> TokenWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.ids.__exit__(exc_type, exc, tb)
        if exc_type is None:
            with AtomicWriter(self.directory / "counts.bin", "wb") as w:
                w.file.write(np.asarray(self.counts, dtype="<u4").tobytes())


def iter_token_ids(directory: str | Path, start: int = 0) -> Iterator[np.ndarray]:
    """Stream the token ids written by ``TokenWriter``, from document number ``start`` on."""
    directory = Path(directory)
    counts = np.fromfile(directory / "counts.bin", dtype="<u4")
    with open(directory / "ids.bin", "rb") as f:
        f.seek(int(counts[:start].sum(dtype=np.int64)) * 4)
        for n in counts[start:]:
            yield np.fromfile(f, dtype="<u4", count=int(n))
