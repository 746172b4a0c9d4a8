"""Code completion at a cursor: several candidates from the engine, each cut by its language's stop rule
and ranked by the mean log-probability of the tokens kept.

The model is any r1kit ``LLM``; a code model with FIM markers fills the middle, any other continues
the prefix. Reading the file and finding the cursor is here too; printing is the CLI's.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from r1kit.apps.code.languages import Language, cut, language_for
from r1kit.apps.code.prompt import (
    CodePrompt,
    PromptConfig,
    build_prompt,
    neighbour_files,
)
from r1kit.errors import ConfigError
from r1kit.infer.sampling import SamplingParams


@dataclasses.dataclass(frozen=True)
class CompletionConfig:
    """``n`` candidates sampled at ``temperature`` (0: one greedy candidate); ``single_line`` ends each at
    its line's end instead of the block's."""

    n: int = 3
    max_new_tokens: int = 64
    temperature: float = 0.4
    top_p: float = 0.95
    single_line: bool = False
    context_tokens: int = 8192
    neighbour_files: int = 3
    seed: int | None = 0

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ConfigError(f"n must be at least 1, got {self.n}", param="n")

    @property
    def prompt(self) -> PromptConfig:
        return PromptConfig(context_tokens=self.context_tokens, max_new_tokens=self.max_new_tokens,
                            neighbour_files=self.neighbour_files)


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One completion: ``text`` goes in at the cursor; ``mean_logprob`` is over the tokens that wrote it."""

    text: str
    mean_logprob: float
    tokens: int


@dataclasses.dataclass(frozen=True)
class Cursor:
    """A file split at the cursor."""

    path: Path
    language: Language
    prefix: str
    suffix: str


def read_cursor(path: str | Path, line: int, col: int | None = None, language: str | None = None) -> Cursor:
    """``path`` split before 1-based ``line`` and 0-based ``col`` (default: the end of that line)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} does not exist or is not a file; give the path of a source file", param="file")
    lang = language_for(path, language)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not valid UTF-8 (byte {exc.start}): the code assistant reads UTF-8 source only", param="file") from None
    lines = text.splitlines(keepends=True)
    if not 1 <= line <= len(lines) + 1:
        raise ConfigError(f"--line {line} is outside {path} (lines 1 to {len(lines) + 1})", param="line")
    current = lines[line - 1] if line <= len(lines) else ""
    body = current.rstrip("\r\n")
    col = len(body) if col is None else col
    if not 0 <= col <= len(body):
        raise ConfigError(f"--col {col} is outside line {line} (columns 0 to {len(body)})", param="col")
    prefix = "".join(lines[:line - 1]) + body[:col]
    return Cursor(path=path, language=lang, prefix=prefix, suffix=text[len(prefix):])


def complete(llm, prefix: str, suffix: str, language: Language, *, path: str = "",
             neighbours=(), config: CompletionConfig = CompletionConfig()) -> tuple[CodePrompt, list[Candidate]]:
    """Candidates for the hole between ``prefix`` and ``suffix``, best first (duplicates merged)."""
    tokenizer = llm.get_tokenizer()
    prompt = build_prompt(tokenizer, prefix, suffix, language, path=path, neighbours=neighbours, config=config.prompt)
    greedy = config.temperature == 0
    params = SamplingParams(n=1 if greedy else config.n, temperature=config.temperature, top_p=1.0 if greedy else config.top_p,
                            max_tokens=config.max_new_tokens, logprobs=0, seed=config.seed)
    output = llm.generate([prompt.text], params)[0]
    best: dict[str, Candidate] = {}
    for choice in output.outputs:
        text = cut(language, prefix, prompt.insertion(choice.text), single_line=config.single_line)
        mean, used = _mean_logprob(tokenizer, choice, len(prompt.held_back) + len(text) if text else 0)
        candidate = Candidate(text=text, mean_logprob=mean, tokens=used)
        if text not in best or best[text].mean_logprob < mean:
            best[text] = candidate
    return prompt, sorted(best.values(), key=lambda c: -c.mean_logprob)


def complete_file(llm, cursor: Cursor, config: CompletionConfig = CompletionConfig()) -> tuple[CodePrompt, list[Candidate]]:
    """:func:`complete` at ``cursor``, with neighbouring files of the same language from its folder."""
    neighbours = neighbour_files(cursor.path, cursor.language, config.neighbour_files)
    return complete(llm, cursor.prefix, cursor.suffix, cursor.language, path=cursor.path.name,
                    neighbours=neighbours, config=config)


def _mean_logprob(tokenizer, choice, chars: int) -> tuple[float, int]:
    """Mean log-probability of the fewest leading tokens whose text covers ``chars`` characters of the
    model's output (all of them when nothing was kept: the score of what the model wrote)."""
    entries = [entry[token].logprob for token, entry in zip(choice.token_ids, choice.logprobs or [])]
    if not entries:
        return float("-inf"), 0
    used = len(entries)
    if chars:
        for k in range(1, len(entries) + 1):
            if len(tokenizer.decode(choice.token_ids[:k])) >= chars:
                used = k
                break
    return sum(entries[:used]) / used, used
