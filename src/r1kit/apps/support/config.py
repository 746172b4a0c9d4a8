"""The assistant's settings: one dataclass, checked when built, so a bad value fails at start-up with
the field's name rather than mid-conversation."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from r1kit.errors import ConfigError

INTENT_METHODS = ("head", "zero_shot")


@dataclass(frozen=True)
class SupportConfig:
    """``intent_method``: ``head`` (a trained linear head over pooled hidden states, read from
    ``head_dir``) or ``zero_shot`` (label likelihoods, no training data); ``threshold``: below this
    calibrated confidence a message is ``out_of_scope``; ``max_turns``: turns the model sees (the
    seed's 8); older ones live on in the running summary."""

    intent_method: str = "head"
    head_dir: Path | None = None  # default: <model dir>/intent-head (where `r1kit apps intent train` writes)
    threshold: float = 0.5
    max_turns: int = 8
    max_new_tokens: int = 64  # the seed allows 128; a short reply is a better reply from a small model
    max_message_chars: int = 2000
    low_confidence_handover: int = 2  # consecutive unclear messages before a person takes over
    complaint_handover: int = 2  # complaints in a session before a person takes over
    temperature: float = 0.0  # replies: greedy, so the same conversation gives the same words
    intent_dtype: str = "bfloat16"  # the recogniser's own copy of the model

    def __post_init__(self) -> None:
        if self.intent_method not in INTENT_METHODS:
            raise ConfigError(f"intent_method={self.intent_method!r}: choose one of {', '.join(INTENT_METHODS)}", param="intent_method")
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"threshold={self.threshold} must be in (0, 1): a confidence below it means out of scope", param="threshold")
        for name in ("max_turns", "max_new_tokens", "max_message_chars", "low_confidence_handover", "complaint_handover"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)!r} must be an integer >= 1", param=name)
        if self.temperature < 0:
            raise ConfigError(f"temperature={self.temperature} must be >= 0 (0 is greedy)", param="temperature")
        if self.head_dir is not None:
            object.__setattr__(self, "head_dir", Path(self.head_dir))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> SupportConfig:
        """A config from a mapping (a YAML file's ``support:`` section); unknown keys are refused."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"unknown support settings {unknown}; known ones are {sorted(known)}", param=unknown[0])
        return cls(**raw)
