"""The DeepSeek-R1 reasoning parser: split generated text into ``reasoning_content`` and ``content``.

Rules (those of vLLM's ``deepseek_r1`` parser): R1 chat templates end the prompt with ``<think>\\n``,
so outputs usually hold only ``…</think>answer``. Everything before the first ``</think>`` is
reasoning, everything after it is content; a ``<think>`` the model writes itself is dropped; an
output that ends before ``</think>`` is all reasoning. Where the prompt does not end inside an open
``<think>`` (``in_reasoning=False``: a ChatML template such as SmolLM2's or Qwen2.5's, or a template
that closed the thinking), the output is content unless it opens with ``<think>`` itself, as vLLM
decides from the prompt (``is_reasoning_end``) and as its Qwen3 parser does. Pure functions and a
small streaming state; no tokenizer needed.
"""

from __future__ import annotations

import dataclasses

THINK, END_THINK = "<think>", "</think>"


def split_reasoning(text: str, in_reasoning: bool = True) -> tuple[str | None, str | None]:
    """(reasoning, content) of a whole output; either may be None when empty. ``in_reasoning``: the
    prompt ended inside an open ``<think>``."""
    if text.startswith(THINK):
        text, in_reasoning = text[len(THINK) :], True
    if not in_reasoning:
        return None, (text or None)
    if END_THINK not in text:
        return (text or None), None
    reasoning, _, content = text.partition(END_THINK)
    return (reasoning or None), (content or None)


@dataclasses.dataclass
class ReasoningStream:
    """Feeds text deltas, returns (reasoning delta, content delta) pieces, holding back any suffix
    that might be the start of ``</think>`` or ``<think>`` until the next delta settles it.
    ``in_reasoning``: as for :func:`split_reasoning`."""

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
                text, self.in_reasoning = text[len(THINK) :], True
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
