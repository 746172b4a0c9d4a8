"""The DeepSeek-R1 reasoning parser: split generated text into ``reasoning_content`` and ``content``.

Rules (those of vLLM's ``deepseek_r1`` parser): R1 chat templates end the prompt with ``<think>\\n``,
so outputs usually hold only ``…</think>answer``. Everything before the first ``</think>`` is
reasoning, everything after it is content; a ``<think>`` the model writes itself is dropped; an
output that ends before ``</think>`` is all reasoning. Pure functions and a small streaming state;
no tokenizer needed.
"""

from __future__ import annotations

import dataclasses

THINK, END_THINK = "<think>", "</think>"


def split_reasoning(text: str) -> tuple[str | None, str | None]:
    """(reasoning, content) of a whole output; either may be None when empty."""
    if text.startswith(THINK):
        text = text[len(THINK) :]
    if END_THINK not in text:
        return (text or None), None
    reasoning, _, content = text.partition(END_THINK)
    return (reasoning or None), (content or None)


@dataclasses.dataclass
class ReasoningStream:
    """Feeds text deltas, returns (reasoning delta, content delta) pieces, holding back any suffix
    that might be the start of ``</think>`` or ``<think>`` until the next delta settles it."""

    in_reasoning: bool = True
    _pending: str = ""
    _started: bool = False

    def feed(self, delta: str, final: bool = False) -> tuple[str, str]:
        text = self._pending + delta
        self._pending = ""
        if not self._started:
            if THINK.startswith(text) and not final:  # wait: this may still become "<think>"
                self._pending = text
                return "", ""
            self._started = True
            if text.startswith(THINK):
                text = text[len(THINK) :]
        if not self.in_reasoning:
            return "", text
        if END_THINK in text:
            reasoning, _, content = text.partition(END_THINK)
            self.in_reasoning = False
            return reasoning, content
        keep = 0 if final else _partial_suffix(text, END_THINK)
        if keep:
            self._pending = text[-keep:]
            text = text[:-keep]
        return text, ""


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
