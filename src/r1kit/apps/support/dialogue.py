"""Sessions: the turns of one conversation, its tracked state, and what the model sees of it — the
last ``max_turns`` turns (the seed's 8) and a running summary of the turns before them, which keeps
what they established (the slots, the tasks done) in a few short lines.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from r1kit.apps.support.state import DialogueState

MAX_STORED_TURNS = 200  # the page shows this much history; the summary keeps the rest
MAX_SUMMARY_LINES = 12
_CJK = re.compile(r"[\u3400-\u9fff]")


def language(text: str) -> str:
    """``zh`` if the text has Chinese characters, else ``en``: the language the reply is written in."""
    return "zh" if _CJK.search(text) else "en"


@dataclass
class Turn:
    """One exchange: the customer's message and the assistant's reply, with how it was read."""

    user: str
    reply: str
    intent: str
    confidence: float
    decision: str
    given: dict[str, str] = field(default_factory=dict)  # slot values read from this message
    action: dict[str, Any] | None = None


@dataclass
class Session:
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: float = field(default_factory=time.time)
    state: DialogueState = field(default_factory=DialogueState)
    turns: list[Turn] = field(default_factory=list)
    summarized: int = 0  # turns (counted from the first ever) folded into the summary
    summary: list[str] = field(default_factory=list)
    dropped: int = 0  # turns no longer stored (beyond MAX_STORED_TURNS)

    @property
    def turn_count(self) -> int:
        return self.dropped + len(self.turns)

    def window(self, max_turns: int) -> list[Turn]:
        """The turns the model sees."""
        return self.turns[-max_turns:]

    def record(self, turn: Turn, max_turns: int) -> None:
        """Add a turn; turns leaving the window go into the summary."""
        self.turns.append(turn)
        while self.turn_count - self.summarized > max_turns:
            old = self.turns[self.summarized - self.dropped]
            self.summary.append(_summary_line(self.summarized + 1, old))
            self.summary = self.summary[-MAX_SUMMARY_LINES:]
            self.summarized += 1
        excess = len(self.turns) - MAX_STORED_TURNS
        if excess > 0 and self.summarized - self.dropped >= excess:
            self.turns = self.turns[excess:]
            self.dropped += excess

    def summary_text(self) -> str:
        """The summary the model reads: what older turns did, and every slot value known so far."""
        facts = ", ".join(f"{name}={slot.value}" for name, slot in self.state.slots.items())
        parts = (["Earlier: " + "; ".join(self.summary)] if self.summary else []) + ([f"Known: {facts}"] if facts else [])
        return "\n".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "state": self.state.to_dict()}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Session:
        return cls(**{**raw, "state": DialogueState.from_dict(raw["state"]), "turns": [Turn(**t) for t in raw["turns"]]})


def _summary_line(number: int, turn: Turn) -> str:
    given = "".join(f" {k}={v}" for k, v in turn.given.items())
    done = f", {turn.action['intent']} {'done' if turn.action['ok'] else 'failed'}" if turn.action else ""
    return f"turn {number}: {turn.intent}{given} -> {turn.decision}{done}"
