"""The completion prompt: the code around the cursor and neighbouring files of the same project, within
the model's context window.

Where the tokenizer has fill-in-the-middle markers (:mod:`r1kit.fim`), the prompt is prefix, suffix
and middle marker; otherwise it is the prefix alone. Neighbouring files come first: as
``<|file_sep|>path`` sections where the FIM family has a file separator (Qwen2.5-Coder's and
StarCoder2's repository-level format), else as plain text under a comment naming the file. When the
whole does not fit, whole lines far from the cursor go first: the prefix loses its first lines, the
suffix its last, and neighbours take only what the cursor's code leaves. This module builds text: it
must never run a model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from r1kit.apps.code.languages import Language
from r1kit.errors import ConfigError
from r1kit.fim import FimStyle, added_tokens, detect_fim

# a neighbour bigger than this is skipped (generated or data files, not code to learn the project from)
MAX_NEIGHBOUR_BYTES = 256 << 10


@dataclasses.dataclass(frozen=True)
class PromptConfig:
    """``context_tokens``: the window the prompt and the completion share (the seed's 8,192);
    ``suffix_share``: the most of the window the suffix takes while the prefix still wants room."""

    context_tokens: int = 8192
    max_new_tokens: int = 64
    neighbour_files: int = 3
    suffix_share: float = 0.25

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.context_tokens <= self.max_new_tokens + 16:
            raise ConfigError(f"context_tokens ({self.context_tokens}) must exceed max_new_tokens ({self.max_new_tokens}) "
                              "by more than 16 tokens, and max_new_tokens must be at least 1", param="context_tokens")
        if self.neighbour_files < 0 or not 0 <= self.suffix_share <= 1:
            raise ConfigError("neighbour_files must be >= 0 and suffix_share in [0, 1]", param="neighbour_files")


@dataclasses.dataclass(frozen=True)
class CodePrompt:
    """A built prompt. ``prefix``/``suffix`` are the parts of the code kept; ``held_back`` is the
    whitespace taken off the end of the prefix (a model tokenizes a trailing space with the next word),
    which the completion is expected to begin with (see :meth:`insertion`)."""

    text: str
    fim: FimStyle | None
    prefix: str
    suffix: str
    neighbours: tuple[str, ...]
    tokens: int
    held_back: str

    def insertion(self, completion: str) -> str:
        """The model's text as it goes in at the cursor: the held-back whitespace, written again by the
        model, is already in the file."""
        if completion.startswith(self.held_back):
            return completion[len(self.held_back):]
        return completion.lstrip(" \t") if self.held_back else completion


def build_prompt(
    tokenizer,
    prefix: str,
    suffix: str,
    language: Language,
    *,
    path: str = "",
    neighbours: Sequence[tuple[str, str]] = (),
    config: PromptConfig = PromptConfig(),
) -> CodePrompt:
    """The prompt for the hole between ``prefix`` and ``suffix`` in the file ``path``, with ``neighbours``
    (``(path, text)`` pairs) where room is left. ``tokenizer`` is a ``tokenizers.Tokenizer``."""
    style = detect_fim(tokenizer)
    separator = style.file_separator if style and style.file_separator in added_tokens(tokenizer) else None
    body = prefix.rstrip(" \t")
    held_back = prefix[len(body):]
    if style is None:
        suffix = ""
    markers = style.markers if style else ()
    neighbours = [(name, text) for name, text in neighbours if not any(m in text for m in (*markers, separator or "\0"))]

    def count(text: str) -> int:
        return len(tokenizer.encode(text).ids)

    def assemble(pre: str, suf: str, near: Sequence[tuple[str, str]]) -> str:
        if separator:
            files = "".join(f"{separator}{name}\n{text.rstrip()}\n" for name, text in near)
            head = f"{files}{separator}{path}\n" if near else ""
            return head + style.prompt(pre, suf)
        files = "".join(language.comment(f"file: {name}") + text.rstrip() + "\n\n" for name, text in near)
        head = files + language.comment(f"file: {path}") if near else ""
        return style.prompt(head + pre, suf) if style else head + pre

    budget = config.context_tokens - config.max_new_tokens - count(assemble("", "", []))
    pre_lines, suf_lines = body.splitlines(keepends=True), suffix.splitlines(keepends=True)
    pre_counts, suf_counts = _line_counts(tokenizer, pre_lines), _line_counts(tokenizer, suf_lines)
    suffix_room = min(sum(suf_counts), int(budget * config.suffix_share))
    keep_pre = _fit(pre_counts[::-1], budget - suffix_room)
    keep_suf = _fit(suf_counts, budget - sum(pre_counts[len(pre_counts) - keep_pre:]))
    while True:  # line counts are close to, not exactly, the count of the joined text
        pre = "".join(pre_lines[len(pre_lines) - keep_pre:])
        suf = "".join(suf_lines[:keep_suf])
        used = count(assemble(pre, suf, []))
        if used <= config.context_tokens - config.max_new_tokens or keep_pre + keep_suf <= 1:
            break
        if keep_suf > 0 and (keep_suf > keep_pre or keep_pre <= 1):
            keep_suf -= 1
        else:
            keep_pre -= 1
    near = []
    for name, text in neighbours[:config.neighbour_files]:
        trial = count(assemble(pre, suf, [*near, (name, text)]))
        if trial <= config.context_tokens - config.max_new_tokens:
            near.append((name, text))
            used = trial
    return CodePrompt(text=assemble(pre, suf, near), fim=style, prefix=pre, suffix=suf,
                      neighbours=tuple(name for name, _ in near), tokens=used, held_back=held_back)


def _line_counts(tokenizer, lines: list[str]) -> list[int]:
    return [len(encoding.ids) for encoding in tokenizer.encode_batch(lines, add_special_tokens=False)] if lines else []


def _fit(counts: Sequence[int], budget: int) -> int:
    """How many of ``counts``, taken in order, fit in ``budget``."""
    total = 0
    for kept, n in enumerate(counts):
        total += n
        if total > budget:
            return kept
    return len(counts)


def neighbour_files(path: Path, language: Language, limit: int) -> list[tuple[str, str]]:
    """Up to ``limit`` other files of ``language`` in ``path``'s folder, the most recently changed first
    (the ones a person is most likely working on together), as ``(name, text)``."""
    found = []
    for other in path.parent.iterdir() if limit else ():
        if other == path or not other.is_file() or other.suffix.lower() not in language.extensions:
            continue
        if other.stat().st_size > MAX_NEIGHBOUR_BYTES:
            continue
        try:
            found.append((other.stat().st_mtime, other.name, other.read_text(encoding="utf-8")))
        except UnicodeDecodeError:
            continue  # not text this prompt could carry
    found.sort(key=lambda item: (-item[0], item[1]))
    return [(name, text) for _, name, text in found[:limit]]
