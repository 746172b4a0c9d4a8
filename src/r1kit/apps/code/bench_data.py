"""The completion benchmark, built from real code on this machine that nobody here wrote: Python's
standard library, the C and C++ headers in /usr/include, shell scripts, Perl modules, and PHP or
JavaScript where the machine has them.

A sample masks either a line (from its first non-blank character to its end: single-line mode) or a
block's body (the lines under a line that opens a block, up to where the block closes), at positions
drawn with a fixed seed. Scores are exact match and edit similarity (one minus the Levenshtein
distance over the longer length), as code-completion papers report them (CodeXGLUE, RepoBench). The
reference block ends are found here by their own simple scan, independent of the stop rules under
test in :mod:`r1kit.apps.code.languages`.
"""

from __future__ import annotations

import dataclasses
import random
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

MAX_FILE_BYTES = 200_000
MAX_BLOCK_LINES = 12


@dataclasses.dataclass(frozen=True)
class Sample:
    """One masked span: the model sees ``prefix`` (and ``suffix`` where it fills the middle) and should
    write ``target``; ``kind`` is ``line`` or ``block``."""

    language: str
    kind: str
    path: str
    prefix: str
    suffix: str
    target: str


def sources() -> dict[str, Iterator[Path]]:
    """Per language, the files this machine has, in a stable order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return {
        "python": (p for p in sorted(stdlib.glob("*.py"))),
        "c": (p for p in sorted(Path("/usr/include").glob("*.h"))),
        "cpp": (p for p in sorted(Path("/usr/include/c++").glob("*/bits/*.h"))),
        "shell": (p for p in sorted([*Path("/usr/bin").glob("*"), *Path("/usr/share").rglob("*.sh")]) if _is_shell(p)),
        "perl": (p for p in sorted(Path("/usr/share/perl").glob("*/**/*.pm"))),
        "php": (p for p in sorted(Path("/usr/share").rglob("*.php"))),
        "javascript": (p for p in sorted(Path("/usr/share").rglob("*.js")) if not p.name.endswith(".min.js")),
    }


def _is_shell(path: Path) -> bool:
    if path.suffix == ".sh":
        return path.is_file()
    try:
        with path.open("rb") as f:
            first = f.readline(64)
    except OSError:
        return False
    return first.startswith((b"#!/bin/sh", b"#!/bin/bash", b"#! /bin/sh", b"#!/usr/bin/env bash"))


def build(per_language: int = 20, seed: int = 0, max_files: int = 400) -> list[Sample]:
    """``per_language`` samples (half lines, half blocks where blocks are found) for each language with
    code here; the same machine and seed give the same samples."""
    rng = random.Random(seed)
    samples: list[Sample] = []
    for language, paths in sources().items():
        texts = []
        for path in paths:
            if len(texts) >= max_files:
                break
            text = _read(path)
            if text is not None and text.count("\n") >= 20:
                texts.append((str(path), text))
        if not texts:
            continue
        found: list[Sample] = []
        for attempt in range(per_language * 40):
            if len(found) >= per_language:
                break
            name, text = texts[rng.randrange(len(texts))]
            kind = "line" if len(found) % 2 == 0 else "block"
            sample = _mask(language, kind, name, text, rng)
            if sample is not None:
                found.append(sample)
        samples.extend(found)
    return samples


def _read(path: Path) -> str | None:
    try:
        if not path.is_file() or path.stat().st_size > MAX_FILE_BYTES:
            return None
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _mask(language: str, kind: str, name: str, text: str, rng: random.Random) -> Sample | None:
    lines = text.splitlines(keepends=True)
    i = rng.randrange(len(lines))
    if kind == "line":
        line = lines[i]
        content = line.strip()
        if len(content) < 8 or content.startswith(("#", "//", "/*", "*")):
            return None
        start = sum(map(len, lines[:i])) + len(line) - len(line.lstrip())
        end = sum(map(len, lines[:i])) + len(line.rstrip("\r\n"))
        return Sample(language, "line", name, text[:start], text[end:], text[start:end])
    body = _block_body(language, lines, i)
    if body is None:
        return None
    first, last = body
    start = sum(map(len, lines[:first]))
    end = sum(map(len, lines[:last]))
    target = text[start:end]
    if len(target.strip()) < 8:
        return None
    return Sample(language, "block", name, text[:start], text[end:], target)


def _block_body(language: str, lines: list[str], i: int) -> tuple[int, int] | None:
    """Lines ``[first, last)`` of the body of a block opened on line ``i``: Python's by indentation, the
    others' by counting braces to the line that closes it."""
    header = lines[i].rstrip()
    if language == "python":
        if not header.endswith(":") or header.lstrip().startswith("#"):
            return None
        indent = len(header) - len(header.lstrip())
        last = i + 1
        while last < len(lines) and (not lines[last].strip() or len(lines[last]) - len(lines[last].lstrip()) > indent):
            last += 1
        while last > i + 1 and not lines[last - 1].strip():
            last -= 1
    else:
        if not header.endswith("{") or header.count("{") != 1 or header.count("}"):
            return None
        depth, last = 1, i + 1
        while last < len(lines) and depth > 0:
            depth += lines[last].count("{") - lines[last].count("}")
            last += 1
        if depth > 0:
            return None
        last -= 1  # the closing line stays in the suffix
        if lines[last].strip() != "}" and not lines[last].strip().startswith("}"):
            return None
    if not i + 1 < last <= i + 1 + MAX_BLOCK_LINES:
        return None
    return i + 1, last


def edit_similarity(a: str, b: str) -> float:
    """1 - Levenshtein(a, b) / max(len(a), len(b)); 1.0 for two empty strings."""
    if not a and not b:
        return 1.0
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return 1.0 - previous[-1] / max(len(a), len(b))


def exact_match(prediction: str, target: str) -> bool:
    """Equal up to trailing whitespace on each line and blank lines at either end."""
    norm = lambda s: "\n".join(line.rstrip() for line in s.strip("\n").split("\n")).strip()
    return norm(prediction) == norm(target)


def stdlib_modules() -> list[Path]:
    """Ten small pure-Python standard-library modules for the test-generation benchmark."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    names = ("colorsys", "fnmatch", "shlex", "textwrap", "string", "reprlib", "graphlib", "bisect", "base64", "quopri")
    return [stdlib / f"{name}.py" for name in names if (stdlib / f"{name}.py").is_file() and name in sys.stdlib_module_names]
