"""The records that flow between stages (documents and drops) and their atomic JSONL files.

Stages hand each other JSON-lines files, one document per line, so that every stage streams and a
finished stage's output can be reused by a resumed run. This module must never hold a whole corpus
in memory, and never leave a half-written file under its final name.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Iterator


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
    crashed stage leaves nothing that a resumed run could mistake for finished output.
    """

    def __init__(self, path: str | Path, mode: str = "w"):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.tmp, mode, encoding=None if "b" in mode else "utf-8")

    def commit(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)

    def __enter__(self) -> AtomicWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.file.close()
            self.tmp.unlink(missing_ok=True)


class JsonlWriter(AtomicWriter):
    """Atomic JSON-lines writer that also records the byte offset of every line it writes."""

    def __init__(self, path: str | Path):
        super().__init__(path, "wb")
        self.offsets: list[int] = []
        self._pos = 0

    def write(self, record: Doc | Drop) -> int:
        """Append one record; returns its byte offset (for ``read_at``)."""
        data = record.to_json().encode("utf-8") + b"\n"
        self.offsets.append(self._pos)
        self.file.write(data)
        self._pos += len(data)
        return self.offsets[-1]


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
