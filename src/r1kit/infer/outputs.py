"""What the engine returns: vLLM-shaped ``RequestOutput`` / ``CompletionOutput``.

Fields are cumulative (the text and ids so far), as vLLM's; streaming callers also get
``delta_text`` / ``delta_token_ids``: what appeared since the previous ``step()`` that reported
this request. :func:`coalesce` folds two consecutive outputs of one request into one (a streaming
consumer that fell behind sends one chunk for several steps).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
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


def coalesce(earlier: RequestOutput, later: RequestOutput) -> RequestOutput:
    """``later`` (cumulative) with the deltas of ``earlier`` prepended: as if one step had produced both."""
    before = {c.index: c for c in earlier.outputs}
    outputs = [
        replace(c, delta_text=before[c.index].delta_text + c.delta_text, delta_token_ids=before[c.index].delta_token_ids + c.delta_token_ids)
        if c.index in before else c
        for c in later.outputs
    ]
    return replace(later, outputs=outputs)
