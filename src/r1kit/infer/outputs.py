"""What the engine returns: vLLM-shaped ``RequestOutput`` / ``CompletionOutput``.

Fields are cumulative (the text and ids so far), as vLLM's; streaming callers also get
``delta_text`` / ``delta_token_ids``: what appeared since the previous ``step()`` that reported
this request. Nothing here computes anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Any]] | None = None  # per token: {token_id: Logprob}
    finish_reason: str | None = None  # "stop" (EOS, stop id or string), "length" or "abort"
    stop_reason: int | str | None = None  # the stop id or stop string that ended it
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache
    prompt_logprobs: list[dict[int, Any] | None] | None = None
    metrics: RequestMetrics | None = None
