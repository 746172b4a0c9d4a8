"""The code assistant's languages (the seed's §5.2 twelve): how each is recognised by its file name,
how it comments, and where a completion ends.

A completion is cut by the language's block rule: Python's block ends where a line is indented less
than the block (by indentation), a brace language's where the brace that was open at the cursor
closes, shell's where its ``if/fi``, ``case/esac``, ``do/done`` and braces balance; in single-line
mode, at the end of the line. The scan skips strings and comments, so a brace in ``"}"`` or
``// }`` never ends a block. This module knows text only: it must never load a model.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from r1kit.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Language:
    """One language: ``blocks`` is ``"indent"`` (Python) or ``"tokens"`` (``openers``/``closers``
    words and braces, counted outside strings and comments)."""

    name: str
    extensions: tuple[str, ...]
    line_comment: str
    block_comment: tuple[str, str] | None
    blocks: str = "tokens"
    openers: frozenset[str] = frozenset({"{"})
    closers: frozenset[str] = frozenset({"}"})
    quotes: tuple[str, ...] = ('"', "'")

    def comment(self, text: str) -> str:
        """``text`` as line comments of this language."""
        return "".join(f"{self.line_comment} {line}".rstrip() + "\n" for line in text.splitlines())


_C_COMMENT = ("/*", "*/")
LANGUAGES: tuple[Language, ...] = (
    Language("python", (".py", ".pyi"), "#", None, blocks="indent", quotes=('"""', "'''", '"', "'")),
    Language("c", (".c", ".h"), "//", _C_COMMENT),
    Language("cpp", (".cc", ".cpp", ".cxx", ".hpp", ".hh", ".hxx", ".tcc"), "//", _C_COMMENT),
    Language("java", (".java",), "//", _C_COMMENT),
    Language("csharp", (".cs",), "//", _C_COMMENT),
    Language("javascript", (".js", ".mjs", ".cjs", ".jsx"), "//", _C_COMMENT, quotes=('"', "'", "`")),
    Language("typescript", (".ts", ".tsx"), "//", _C_COMMENT, quotes=('"', "'", "`")),
    Language("go", (".go",), "//", _C_COMMENT, quotes=('"', "'", "`")),
    Language("rust", (".rs",), "//", _C_COMMENT, quotes=('"',)),  # 'a is a lifetime, not a quote
    Language("php", (".php",), "//", _C_COMMENT),
    Language("perl", (".pl", ".pm"), "#", None),
    Language("shell", (".sh", ".bash"), "#", None,
             openers=frozenset({"{", "if", "case", "do"}), closers=frozenset({"}", "fi", "esac", "done"})),
)
BY_NAME = {language.name: language for language in LANGUAGES}
_BY_EXTENSION = {ext: language for language in LANGUAGES for ext in language.extensions}


def language_for(path: str | Path, name: str | None = None) -> Language:
    """The language named ``name``, else the one of ``path``'s extension; a clear error for any other."""
    if name is not None:
        if name not in BY_NAME:
            raise ConfigError(f"unknown language {name!r}; known: {', '.join(BY_NAME)}", param="language")
        return BY_NAME[name]
    ext = Path(path).suffix.lower()
    if ext not in _BY_EXTENSION:
        raise ConfigError(f"{path}: no known language has the extension {ext or '(none)'!r}; known extensions: "
                          f"{' '.join(sorted(_BY_EXTENSION))} (or name the language with --language)", param="language")
    return _BY_EXTENSION[ext]


def cut(language: Language, prefix: str, completion: str, *, single_line: bool = False) -> str:
    """The part of ``completion`` (model text inserted after ``prefix``) that ends the block open at
    the cursor, or, with ``single_line``, the current line."""
    if single_line:
        return completion.split("\n", 1)[0]
    if language.blocks == "indent":
        return _cut_indent(prefix, completion)
    return _cut_tokens(language, completion)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


def _cut_indent(prefix: str, completion: str) -> str:
    """Up to the first line indented less than the block at the cursor, trailing blank lines left out.

    A cursor line that opens a block (ends with ``:``) owns the lines indented deeper than it; any other
    cursor line sits in a block of the lines indented at least as deep as it. A blank cursor line
    leaves the choice to the first line the model writes."""
    current = prefix[prefix.rfind("\n") + 1:]
    lines = completion.split("\n")
    first = next((k for k, line in enumerate(lines) if (current * (k == 0) + line).strip()), None)
    if first is None:
        return completion
    header = current * (first == 0) + lines[first]
    opens = first == 0 and bool(current.strip()) and header.rstrip().endswith(":")
    floor = _indent(header) + 1 if opens else _indent(header)
    position = sum(len(line) + 1 for line in lines[:first + 1])
    for line in lines[first + 1:]:
        if line.strip() and _indent(line) < floor:
            kept = completion[:position].rstrip(" \t\n")
            return kept + "\n"
        position += len(line) + 1
    return completion


_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|\S")


def _cut_tokens(language: Language, completion: str) -> str:
    """Up to the brace (or keyword) that closes the block open at the cursor, left out with the
    indentation before it; or, when the completion begins by opening a block (the cursor after a
    function's signature), to the end of the line that closes that block."""
    depth, opened, first, i = 0, False, True, 0
    n = len(completion)
    while i < n:
        skip = _skip_literal(language, completion, i)
        if skip != i:
            i = skip
            continue
        if completion[i] == "\n" and opened and depth == 0:
            return completion[:i + 1]
        match = _WORD.match(completion, i)
        if match is None:
            i += 1
            continue
        token = match.group()
        # a keyword counts only as a whole word, not inside an identifier like ``done_count``
        if token in language.openers:
            depth, opened = depth + 1, opened or first
        elif token in language.closers:
            if depth == 0:
                start = completion.rfind("\n", 0, i) + 1
                return completion[:start] if completion[start:i].strip() == "" else completion[:i]
            depth -= 1
        first = False
        i = match.end()
    return completion


def _skip_literal(language: Language, text: str, i: int) -> int:
    """The index after a string or comment that starts at ``i``, or ``i`` when none does."""
    if text.startswith(language.line_comment, i):
        end = text.find("\n", i)
        return len(text) if end < 0 else end
    if language.block_comment and text.startswith(language.block_comment[0], i):
        end = text.find(language.block_comment[1], i + len(language.block_comment[0]))
        return len(text) if end < 0 else end + len(language.block_comment[1])
    for quote in language.quotes:
        if text.startswith(quote, i):
            j = i + len(quote)
            while j < len(text):
                if text[j] == "\\":
                    j += 2
                elif text.startswith(quote, j):
                    return j + len(quote)
                elif text[j] == "\n" and len(quote) == 1 and quote != "`":
                    return j  # an unterminated one-line string ends with its line
                else:
                    j += 1
            return len(text)
    return i
