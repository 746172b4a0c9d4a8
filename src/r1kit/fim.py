"""Fill-in-the-middle (FIM) prompts: the code before and after a hole, in the format the model was trained on.

Every family here uses PSM order (prefix, suffix, middle): ``<P>prefix<S>suffix<M>``, and the model
writes the middle until its end-of-sequence token. The family is read off the tokenizer: the one
whose three markers are all added tokens (so that encoding the prompt text yields each marker as its
single id). The text is then encoded like any completion prompt, with the tokenizer's BOS where it
adds one (DeepSeek-Coder's examples encode it so). CodeLlama's ``▁<PRE>``/``▁<SUF>``/``▁<MID>`` are not
here: its prompt depends on SentencePiece's leading-space rules, which a text template cannot carry.
"""

from __future__ import annotations

import dataclasses

from r1kit.errors import ConfigError


class FimError(ConfigError):
    """A FIM prompt cannot be built; ``param`` is the request field at fault (``prompt`` or ``suffix``)."""


@dataclasses.dataclass(frozen=True)
class FimStyle:
    """One family's three markers, and the marker its repository-level prompts put before each file
    (``<|file_sep|>path\ncontent``, Qwen2.5-Coder's and StarCoder2's format), where it has one."""

    name: str
    prefix: str
    suffix: str
    middle: str
    file_separator: str | None = None

    @property
    def markers(self) -> tuple[str, str, str]:
        return self.prefix, self.suffix, self.middle

    def prompt(self, prefix: str, suffix: str) -> str:
        """The prompt text for the hole between ``prefix`` and ``suffix``. A marker inside either would
        be read as structure, not text, so it is refused rather than silently changing the prompt."""
        for field, text in (("prompt", prefix), ("suffix", suffix)):
            found = next((m for m in self.markers if m in text), None)
            if found is not None:
                raise FimError(f"{field} contains {found!r}, this model's {self.name} FIM marker; remove it from the text", param=field)
        return f"{self.prefix}{prefix}{self.suffix}{suffix}{self.middle}"


STYLES = (
    FimStyle("starcoder", "<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<file_sep>"),  # StarCoder(2), SantaCoder (not SmolLM2: its vocabulary has none)
    FimStyle("qwen", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|file_sep|>"),  # Qwen2.5(-Coder), CodeGemma
    FimStyle("deepseek", "<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),  # DeepSeek-Coder (fullwidth bars, U+2581)
)


def added_tokens(tokenizer) -> set[str]:
    """The added (special) tokens of a ``tokenizers.Tokenizer`` (or anything with ``get_added_tokens_decoder``)."""
    return {token.content for token in tokenizer.get_added_tokens_decoder().values()}


def detect_fim(tokenizer) -> FimStyle | None:
    """The FIM family of a ``tokenizers.Tokenizer`` (or anything with ``get_added_tokens_decoder``), or None."""
    added = added_tokens(tokenizer)
    return next((style for style in STYLES if set(style.markers) <= added), None)


def describe_styles() -> str:
    """The markers r1kit knows, for error messages."""
    return ", ".join("/".join(style.markers) for style in STYLES)
