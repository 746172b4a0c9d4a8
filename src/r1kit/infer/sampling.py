"""Sampling parameters and the logits processors that turn a model's logits into the next token.

Field names follow vLLM's ``SamplingParams`` so code written for it reads the same here. The
defaults of ``r1kit generate``, where the model's ``generation_config.json`` sets none, are the seed's
§6.2 recipe against repetitive output (``r1kit.cli.generate.RECIPE``); ``temperature=0`` is greedy.
Everything here is a pure function of its inputs (the random generator is passed in).
"""

from __future__ import annotations

import dataclasses
import json as _json
import numbers
from collections.abc import Mapping
from typing import Any

import torch

from r1kit.errors import ConfigError


# OpenAI's and vLLM's (``max_logprobs``) cap on the alternatives returned per token
MAX_LOGPROBS = 20
# Bounds on the list-valued settings. Each entry costs work on every decoding step (a stop string is
# searched for in each new piece of text, and streamed text is held back by the longest one; a token
# id is looked up per token), so one request with 100k stop strings slowed every other request 2.3x.
# Generous next to OpenAI's 4 stop sequences (vLLM sets no bound).
MAX_STOP = 64  # stop strings per request
MAX_STOP_CHARS = 512  # characters per stop string
MAX_TOKEN_IDS = 1024  # stop_token_ids, and logit_bias entries


@dataclasses.dataclass(frozen=True)
class Range:
    """The values one numeric sampling setting accepts. :data:`RANGES` is the one statement of
    each range: it checks :class:`SamplingParams` (so the Python API and the HTTP API refuse the same
    values with the same error) and ``generation_config.json``, and the HTTP API's OpenAPI document
    shows it."""

    low: float
    high: float | None = None
    low_open: bool = False  # ``low`` itself is out
    high_open: bool = False
    integer: bool = False
    note: str = ""  # what the values mean, for the error message

    def __contains__(self, value: object) -> bool:
        kind = numbers.Integral if self.integer else numbers.Real
        if isinstance(value, bool) or not isinstance(value, kind):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below  # NaN fails every comparison: refused

    def __str__(self) -> str:
        kind = "an integer" if self.integer else "a number"
        if self.high is None:
            text = f"{kind} {'>' if self.low_open else '>='} {self.low}"
        else:
            text = f"{kind} in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
        return f"{text} ({self.note})" if self.note else text

    def json_schema(self) -> dict[str, float]:
        """The range as JSON Schema keywords (``minimum``, ``exclusiveMaximum``, ...)."""
        schema = {"exclusiveMinimum" if self.low_open else "minimum": self.low}
        if self.high is not None:
            schema["exclusiveMaximum" if self.high_open else "maximum"] = self.high
        return schema


RANGES = {
    "temperature": Range(0, note="0 is greedy"),
    "top_k": Range(-1, integer=True, note="-1 or 0: off"),
    "top_p": Range(0, 1, low_open=True),
    "min_p": Range(0, 1, note="0: off"),
    "repetition_penalty": Range(0, low_open=True, note="1 is off, >1 discourages repeats"),
    "max_tokens": Range(1, integer=True),
    "seed": Range(0, 2**63, high_open=True, integer=True),
    "n": Range(1, integer=True, note="the number of completions per prompt"),
    "min_tokens": Range(0, integer=True),
    "presence_penalty": Range(-2, 2, note="0 is off"),
    "frequency_penalty": Range(-2, 2, note="0 is off"),
    "logprobs": Range(0, MAX_LOGPROBS, integer=True),
    "prompt_logprobs": Range(0, MAX_LOGPROBS, integer=True),
    "thinking_budget": Range(0, integer=True),
}
LOGIT_BIAS = Range(-100, 100, note="OpenAI's range")


STRUCTURED_KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclasses.dataclass(frozen=True)
class StructuredOutputs:
    """What a request's output must match (vLLM's ``StructuredOutputsParams``): exactly one of a JSON
    schema (``json``: a dict or its JSON text), any JSON object (``json_object``), a regular
    expression, one of a few strings (``choice``), or a grammar (``grammar``: xgrammar's EBNF, with
    ``root ::= ...``, or Lark, with ``start: ...``). The spec is checked here, when the request is built,
    so a bad one is a :class:`ConfigError` (``param="structured"``) and never reaches the engine loop;
    ``r1kit.infer.structured`` compiles it against the tokenizer."""

    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        from r1kit.infer.structured import check_spec  # the grammar library loads with the first spec

        given = [name for name in STRUCTURED_KINDS if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            raise ConfigError(
                f"structured output takes exactly one of {', '.join(STRUCTURED_KINDS)}; got {', '.join(given) or 'none'}",
                param="structured",
            )
        if self.choice is not None:
            choice = (self.choice,) if isinstance(self.choice, str) else tuple(self.choice)
            if not choice or any(not isinstance(c, str) or not c for c in choice):
                raise ConfigError(f"choice={self.choice!r} must be a non-empty list of non-empty strings", param="structured")
            object.__setattr__(self, "choice", choice)
        check_spec(self)

    @property
    def kind(self) -> str:
        return next(name for name in STRUCTURED_KINDS if getattr(self, name) not in (None, False))

    @property
    def key(self) -> tuple[str, str]:
        """(kind, the spec as canonical text): equal for equal specs, whichever form a schema came in."""
        value = getattr(self, self.kind)
        if self.kind == "json" and isinstance(value, str):
            value = _json.loads(value)  # check_spec has parsed it once already
        text = value if isinstance(value, str) else _json.dumps(value, sort_keys=True, ensure_ascii=False)
        return self.kind, text

    def __hash__(self) -> int:  # a schema is a dict: hash the canonical text
        return hash(self.key)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample one request. The constructor is where every request's sampling fields are
    checked (the HTTP API builds one per request): a bad value raises :class:`ConfigError` whose
    ``param`` is the field's name."""

    temperature: float = 1.0
    top_k: int = 0  # 0 or -1: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None
    # --- the engine's controls (vLLM's names); the reference loop (r1kit.infer.generate) ignores them ---
    n: int = 1
    min_tokens: int = 0  # EOS and stop ids are masked until this many tokens are out
    presence_penalty: float = 0.0  # subtracted once from every token already in the output
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output
    logit_bias: Mapping[int, float] | None = None  # token id -> added to its logit
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one found
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # log-probabilities of the sampled token plus this many top alternatives
    prompt_logprobs: int | None = None  # the same for every prompt token (``echo``); bypasses the prefix cache
    skip_special_tokens: bool = True  # in the text (``<think>``/``</think>`` are always kept)
    thinking_budget: int | None = None  # after this many reasoning tokens, force ``</think>``
    # the output must match this spec (the answer's tokens, after any reasoning): r1kit.infer.structured
    structured: StructuredOutputs | None = None

    def __post_init__(self) -> None:
        for name, allowed in RANGES.items():
            value = getattr(self, name)
            if value is None and self.__dataclass_fields__[name].default is None:
                continue  # None is "off" where it is the default
            if value not in allowed:
                raise ConfigError(f"{name}={value!r} must be {allowed}", param=name)
        if self.min_tokens > self.max_tokens:
            raise ConfigError(f"min_tokens={self.min_tokens} must be at most max_tokens={self.max_tokens}", param="min_tokens")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if any(not isinstance(s, str) or not s for s in stop):
            raise ConfigError(f"stop={self.stop!r} must be a string or a list of non-empty strings", param="stop")
        _check_stop_bounds(stop, tuple(self.stop_token_ids or ()))
        if self.structured is not None:
            if not isinstance(self.structured, StructuredOutputs):
                raise ConfigError(f"structured={self.structured!r} must be a StructuredOutputs (json=, json_object=, regex=, choice= or grammar=)", param="structured")
            if self.min_tokens:  # the grammar alone says where the output may end
                raise ConfigError("min_tokens cannot be combined with structured output: the grammar decides where the output ends", param="min_tokens")
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        set_("stop", stop)
        set_("stop_token_ids", tuple(self.stop_token_ids or ()))
        if self.logit_bias is not None:
            set_("logit_bias", _logit_bias(self.logit_bias))

    def replace(self, **changes: Any) -> SamplingParams:
        return dataclasses.replace(self, **changes)

    def with_eos_ids(self, ids: tuple[int, ...]) -> SamplingParams:
        """These params with more end-of-sequence ids (a checkpoint's ``generation_config.json``), as
        vLLM adds them: as stop ids, so that ``ignore_eos`` skips them as it skips the model's EOS."""
        extra = tuple(i for i in ids if i not in self.stop_token_ids)
        if self.ignore_eos or not extra:
            return self
        return self.replace(stop_token_ids=self.stop_token_ids + extra)

    def __hash__(self) -> int:  # logit_bias is a dict; params are compared, rarely hashed
        return hash((self.temperature, self.top_k, self.top_p, self.max_tokens, self.seed, self.n))

    @property
    def greedy(self) -> bool:
        # as vLLM: a temperature this small is greedy (dividing by it would overflow the logits)
        return self.temperature < 1e-5


def _check_stop_bounds(stop: tuple[str, ...], stop_token_ids: tuple[int, ...]) -> None:
    if len(stop) > MAX_STOP:
        raise ConfigError(f"stop has {len(stop)} strings; at most {MAX_STOP} are allowed", param="stop")
    longest = max(map(len, stop), default=0)
    if longest > MAX_STOP_CHARS:
        raise ConfigError(f"a stop string has {longest} characters; at most {MAX_STOP_CHARS} are allowed", param="stop")
    if len(stop_token_ids) > MAX_TOKEN_IDS:
        raise ConfigError(f"stop_token_ids has {len(stop_token_ids)} ids; at most {MAX_TOKEN_IDS} are allowed", param="stop_token_ids")


def check_logit_bias_size(raw: Mapping[Any, Any]) -> None:
    """Refuse a ``logit_bias`` of over :data:`MAX_TOKEN_IDS` entries before looking at any (the HTTP
    API calls it before checking each entry: 60k bad entries made 60k errors)."""
    if len(raw) > MAX_TOKEN_IDS:
        raise ConfigError(f"logit_bias has {len(raw)} entries; at most {MAX_TOKEN_IDS} are allowed", param="logit_bias")


def _logit_bias(raw: Mapping[Any, Any]) -> dict[int, float]:
    """``logit_bias`` with integer token ids (JSON object keys are strings) and float biases."""
    check_logit_bias_size(raw)
    bias = {}
    for key, value in raw.items():
        try:
            token, amount = int(key), float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"logit_bias maps token ids to numbers, got {key!r}: {value!r}", param="logit_bias") from None
        if amount not in LOGIT_BIAS:
            raise ConfigError(f"logit_bias[{key!r}]={value!r} must be {LOGIT_BIAS}", param="logit_bias")
        bias[token] = amount
    return bias


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty as Hugging Face applies it: seen tokens' positive logits are divided by
    ``penalty``, negative ones multiplied, so a repeat always becomes less likely. ``seen``: [B, L] ids."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    picked = logits.gather(-1, seen)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits.scatter(-1, seen, picked)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> torch.Tensor:
    """Set to -inf every token outside top-k, outside the top-p nucleus, or below ``min_p``·p_max."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        # only the finite logits need sorting (after top-k, a few dozen instead of the vocabulary)
        finite = int(torch.isfinite(logits).sum(-1).max())
        if finite < logits.shape[-1]:
            sorted_logits, order = logits.topk(max(finite, 1), dim=-1)
        else:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # keep the smallest prefix reaching top_p
        drop[..., 0] = False  # the most likely token always stays, whatever rounding says
        outside = torch.ones_like(logits, dtype=torch.bool).scatter(-1, order, drop)  # unsorted ones are -inf already
        logits = logits.masked_fill(outside, float("-inf"))
    if min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids [B] from last-position logits [B, V] and the ids seen so far [B, L]."""
    logits = _finite(apply_repetition_penalty(logits.float(), seen, params.repetition_penalty))
    if params.greedy:
        return logits.argmax(-1)
    logits = filter_logits(_finite(logits / params.temperature), params.top_k, params.top_p, params.min_p)
    kept = int(torch.isfinite(logits).sum(-1).max())
    if kept == logits.shape[-1]:
        return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
    # draw among the kept tokens only: the same distribution, and multinomial over the whole
    # vocabulary costs more than a small model's decode step
    values, ids = logits.topk(kept, dim=-1)
    return ids.gather(-1, torch.multinomial(values.softmax(-1), 1, generator=generator)).squeeze(-1)


def _finite(logits: torch.Tensor) -> torch.Tensor:
    """Extreme penalties or temperatures overflow float32: keep the order, never inf or NaN."""
    big = torch.finfo(logits.dtype).max / 4
    return logits.nan_to_num(nan=-big, posinf=big, neginf=-big)


def apply_logit_bias(logits: torch.Tensor, bias: Mapping[int, float] | None) -> torch.Tensor:
    """Add ``bias[token]`` to each listed token's logit (logits: [..., V]); the ids are in the
    vocabulary (``Processor.validate`` refuses a request whose ids are not)."""
    if not bias:
        return logits
    ids = torch.tensor(list(bias), device=logits.device)
    values = torch.tensor(list(bias.values()), dtype=logits.dtype, device=logits.device)
    return logits.index_add(-1, ids, values.expand(*logits.shape[:-1], -1))


def apply_presence_frequency(logits: torch.Tensor, output_ids: torch.Tensor, presence: float, frequency: float) -> torch.Tensor:
    """OpenAI's penalties over the *generated* tokens [L]: ``logit -= presence·[count>0] + frequency·count``."""
    if (presence == 0.0 and frequency == 0.0) or output_ids.numel() == 0:
        return logits
    counts = torch.bincount(output_ids, minlength=logits.shape[-1]).to(logits.dtype)
    return logits - presence * (counts > 0).to(logits.dtype) - frequency * counts
