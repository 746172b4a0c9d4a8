"""Sampling parameters and the logits processors that turn a model's logits into the next token.

Field names follow vLLM's ``SamplingParams`` so code written for it reads the same here. The
defaults of ``r1kit generate``, where the model's ``generation_config.json`` sets none, are the seed's
§6.2 recipe against repetitive output (temperature 0.9, top_k 50, top_p 0.92, repetition_penalty 1.2,
256 new tokens); ``temperature=0`` is greedy.
Everything here is a pure function of its inputs (the random generator is passed in).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from r1kit.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0  # 0 or -1: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None
    # --- the engine's controls (vLLM's names); the reference loop above ignores them ---
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

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ConfigError(f"temperature={self.temperature} must be >= 0 (0 means greedy)")
        if self.top_k < -1:
            raise ConfigError(f"top_k={self.top_k} must be -1 or 0 (off) or a positive count")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p={self.top_p} must be in (0, 1]")
        if not 0.0 <= self.min_p <= 1.0:
            raise ConfigError(f"min_p={self.min_p} must be in [0, 1]")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"repetition_penalty={self.repetition_penalty} must be > 0 (1 is off, >1 discourages repeats)")
        if self.max_tokens < 1:
            raise ConfigError(f"max_tokens={self.max_tokens} must be >= 1")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed={self.seed} must be in [0, 2**63)")
        if self.n < 1:
            raise ConfigError(f"n={self.n} must be >= 1 (the number of completions per prompt)")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ConfigError(f"min_tokens={self.min_tokens} must be between 0 and max_tokens={self.max_tokens}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ConfigError(f"{name}={getattr(self, name)} must be in [-2, 2] (0 is off)")
        for name in ("logprobs", "prompt_logprobs", "thinking_budget"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"{name}={value} must be >= 0 or None")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if any(not isinstance(s, str) or not s for s in stop):
            raise ConfigError(f"stop={self.stop!r} must be a string or a list of non-empty strings")
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        set_("stop", stop)
        set_("stop_token_ids", tuple(self.stop_token_ids or ()))
        if self.logit_bias is not None:
            bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            if any(not -100.0 <= v <= 100.0 for v in bias.values()):  # also refuses nan and inf
                raise ConfigError("logit_bias values must be numbers in [-100, 100] (OpenAI's range)")
            set_("logit_bias", bias)

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
    """Add ``bias[token]`` to each listed token's logit (logits: [..., V])."""
    if not bias:
        return logits
    ids = torch.tensor(list(bias), device=logits.device)
    if int(ids.min()) < 0 or int(ids.max()) >= logits.shape[-1]:
        raise ConfigError(f"logit_bias names token ids outside the vocabulary [0, {logits.shape[-1]})")
    values = torch.tensor(list(bias.values()), dtype=logits.dtype, device=logits.device)
    return logits.index_add(-1, ids, values.expand(*logits.shape[:-1], -1))


def apply_presence_frequency(logits: torch.Tensor, output_ids: torch.Tensor, presence: float, frequency: float) -> torch.Tensor:
    """OpenAI's penalties over the *generated* tokens [L]: ``logit -= presence·[count>0] + frequency·count``."""
    if (presence == 0.0 and frequency == 0.0) or output_ids.numel() == 0:
        return logits
    counts = torch.bincount(output_ids, minlength=logits.shape[-1]).to(logits.dtype)
    return logits - presence * (counts > 0).to(logits.dtype) - frequency * counts
