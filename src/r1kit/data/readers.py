"""Read (where the clean stage starts): stream raw documents out of folders, text/code files, ``.jsonl`` and ``.parquet``.

The readers yield ``RawDoc`` (bytes or text still to be cleaned) or ``Drop`` (input that could not be
read: unreadable file, a line that is not JSON or lacks the field, a parquet without the column).
They must never load a whole file of many documents at once, and never raise on bad input files:
bad input is counted, not fatal. A missing top-level input is a user error and raises. Anything that
is not a regular file (a FIFO, socket or device, a broken symlink) is dropped after a ``stat``,
never opened: opening a FIFO blocks until a writer appears, reading a device may never end.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import stat
import sysconfig
from pathlib import Path
from typing import Iterator

from r1kit.data.records import Drop
from r1kit.errors import ConfigError

STAGE = "read"
PARQUET_BATCH_ROWS = 1024
# Standard-library folders that are tests or vendored third-party code, not the library itself.
_STDLIB_SKIP = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_SPECIAL_KINDS = {stat.S_IFIFO: "FIFO (named pipe)", stat.S_IFSOCK: "socket", stat.S_IFCHR: "character device",
                  stat.S_IFBLK: "block device"}


@dataclasses.dataclass
class RawDoc:
    """A document as read: ``payload`` is bytes (to be decoded by the cleaner) or already text."""

    id: str
    source: str
    loc: str | None
    kind: str
    payload: bytes | str


def iter_inputs(inputs: tuple[str, ...], text_field: str, text_exts: tuple[str, ...],
                code_exts: tuple[str, ...], output: str | None = None) -> Iterator[RawDoc | Drop]:
    """Every document of ``inputs`` (files or folders, walked in sorted order), or the embedded corpus.

    ``output`` is prepare's output folder: never read, so a re-run does not eat its own shards.
    """
    if not inputs:
        yield from iter_embedded()
        return
    for item in inputs:
        if not os.path.exists(item):
            raise ConfigError(f"input {item!r} does not exist; pass existing files or folders (or none for the embedded corpus)")
        if output and _inside(item, output):
            raise ConfigError(f"input {item!r} is inside the output folder {output!r}, which prepare overwrites; "
                              "move the input or choose another --output")
    skipped: list[Drop] = []
    for path in list_files(inputs, skipped, output):
        yield from iter_file(path, text_field, text_exts, code_exts)
    yield from skipped


def list_files(inputs: tuple[str, ...], skipped: list[Drop] | None = None, exclude: str | None = None) -> list[str]:
    """The files under ``inputs`` in a stable order (the order decides which duplicate is kept).

    Symlinked folders are followed, each real folder once, so a link back to an ancestor cannot
    loop; the folder ``exclude`` is not entered. Folders not entered or not listable are appended
    to ``skipped`` as drops when given.
    """
    files: list[str] = []
    seen: dict[tuple[int, int], str] = {}

    def note(where: str, reason: str, detail: str) -> None:
        if skipped is not None:
            skipped.append(Drop(where, where, None, STAGE, reason, detail))

    def enter(folder: str) -> bool:
        if exclude and _inside(folder, exclude):
            note(folder, "output_folder", "prepare's own output folder is not read as input")
            return False
        try:
            st = os.stat(folder)
        except OSError:
            return True  # os.walk reports it through onerror
        first = seen.setdefault((st.st_dev, st.st_ino), folder)
        if first != folder:
            note(folder, "repeated_folder", f"the same folder as {first} (a symlink loop or a second link): read once")
        return first == folder

    def unlistable(exc: OSError) -> None:
        note(str(exc.filename), "unreadable", f"{type(exc).__name__}: {exc.strerror or exc}")

    for item in inputs:
        if not os.path.isdir(item):
            files.append(item)
        elif enter(item):
            for root, dirs, names in os.walk(item, onerror=unlistable, followlinks=True):
                dirs[:] = [d for d in sorted(dirs) if enter(os.path.join(root, d))]
                files.extend(os.path.join(root, n) for n in sorted(names))
    return files


def _inside(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or under it, symlinks resolved."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _not_a_file(path: str) -> tuple[str, str] | None:
    """(reason, detail) when ``path`` is not a regular file that can be opened without blocking, else None.

    Only ``stat`` is used: the path is never opened.
    """
    try:
        mode = os.stat(path).st_mode  # follows symlinks: a link to a regular file is read
    except OSError as exc:
        link = " (a broken or looping symbolic link)" if os.path.islink(path) else ""
        return "unreadable", f"{type(exc).__name__}: {exc.strerror or exc}{link}"
    if stat.S_ISREG(mode):
        return None
    kind = _SPECIAL_KINDS.get(stat.S_IFMT(mode), "special file")
    return "special_file", f"a {kind} is not a file of documents: skipped unopened (reading it could block or never end)"


def iter_file(path: str, text_field: str, text_exts: tuple[str, ...], code_exts: tuple[str, ...]) -> Iterator[RawDoc | Drop]:
    """The documents of one input file, or one ``Drop`` saying why it was not read."""
    skip = _not_a_file(path)
    if skip is not None:
        yield Drop(path, path, None, STAGE, *skip)
        return
    suffix = Path(path).suffix.lower()
    try:
        if suffix == ".jsonl":
            yield from _iter_jsonl(path, text_field)
        elif suffix == ".parquet":
            yield from _iter_parquet(path, text_field)
        elif suffix in text_exts or suffix in code_exts:
            with open(path, "rb") as f:
                payload = f.read()
            yield RawDoc(path, path, None, "code" if suffix in code_exts else "text", payload)
        else:
            yield Drop(path, path, None, STAGE, "unsupported_type", f"extension {suffix or '(none)'!r} is not read")
    except OSError as exc:  # permission denied, vanished file, I/O error: count it and go on
        yield Drop(path, path, None, STAGE, "unreadable", f"{type(exc).__name__}: {exc.strerror or exc}")


def _iter_jsonl(path: str, field: str) -> Iterator[RawDoc | Drop]:
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            loc, doc_id = f"line {number}", f"{path}:{number}"
            if not line.strip():
                continue  # blank separator lines are not documents
            try:
                record = json.loads(line)
            except UnicodeDecodeError:
                yield Drop(doc_id, path, loc, STAGE, "invalid_utf8", "the line is not valid UTF-8")
                continue
            except ValueError as exc:
                yield Drop(doc_id, path, loc, STAGE, "bad_json", str(exc))
                continue
            if not isinstance(record, dict) or field not in record:
                yield Drop(doc_id, path, loc, STAGE, "missing_field", f"no {field!r} field")
            elif not isinstance(record[field], str):
                yield Drop(doc_id, path, loc, STAGE, "missing_field", f"{field!r} is {type(record[field]).__name__}, not text")
            else:
                yield RawDoc(doc_id, path, loc, "text", record[field])


def _iter_parquet(path: str, field: str) -> Iterator[RawDoc | Drop]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        yield Drop(path, path, None, STAGE, "unreadable", f"not a parquet file: {exc}")
        return
    if field not in file.schema_arrow.names:
        yield Drop(path, path, None, STAGE, "missing_column", f"no {field!r} column (columns: {file.schema_arrow.names})")
        return
    row = 0
    for batch in file.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[field]):
        for value in batch.column(0).to_pylist():
            loc, doc_id = f"row {row}", f"{path}#{row}"
            if isinstance(value, (str, bytes)):  # binary columns are decoded (and checked) by the cleaner
                yield RawDoc(doc_id, path, loc, "text", value)
            else:
                yield Drop(doc_id, path, loc, STAGE, "missing_field", f"{field!r} is {type(value).__name__}, not text")
            row += 1


def iter_embedded() -> Iterator[RawDoc | Drop]:
    """The embedded corpus: the standard library's ``.py`` sources (code) and ``pydoc_data`` topics (text).

    Sources are named ``stdlib/<path>`` so ids do not depend on where Python is installed.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for root, dirs, names in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in _STDLIB_SKIP)
        for name in sorted(names):
            if name.endswith(".py"):
                path = Path(root, name)
                rel = f"stdlib/{path.relative_to(stdlib).as_posix()}"
                try:
                    yield RawDoc(rel, rel, None, "code", path.read_bytes())
                except OSError as exc:
                    yield Drop(rel, rel, None, STAGE, "unreadable", f"{type(exc).__name__}: {exc.strerror or exc}")
    yield from _iter_topics(stdlib / "pydoc_data" / "topics.py")


def _iter_topics(path: Path) -> Iterator[RawDoc | Drop]:
    source = "stdlib/pydoc_data/topics.py"
    try:
        tree = ast.parse(path.read_bytes())
        # the module is one assignment `topics = {...}`: read it as data, never execute it
        topics = next(ast.literal_eval(node.value) for node in tree.body
                      if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "topics")
    except (OSError, SyntaxError, ValueError, StopIteration) as exc:
        yield Drop(source, source, None, STAGE, "unreadable", f"pydoc topics not readable: {exc}")
        return
    for key in sorted(topics):
        yield RawDoc(f"{source}#{key}", source, f"topic {key}", "text", topics[key])
