"""The dialogue state tracker: the task in hand, its slots (with where each value came from and
whether the customer confirmed it), what the assistant is waiting for, and the counters the
hand-over rules read. A state is plain data: it round-trips through JSON for the session store.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from r1kit.apps.support.slots import SCHEMAS


@dataclass
class Slot:
    value: str
    source: str  # "rule" or "model"
    turn: int
    confirmed: bool = False


@dataclass
class DialogueState:
    intent: str | None = None  # the task in hand (a key of SCHEMAS), None between tasks
    slots: dict[str, Slot] = field(default_factory=dict)  # session-wide: an order id given once serves later tasks
    awaiting: str | None = None  # "confirm", or the slot just asked for
    low_confidence: int = 0  # unclear messages in a row
    complaints: int = 0
    handed_over: bool = False
    last_task: str | None = None  # the task that last ran, which a correction reopens
    actions: list[dict[str, Any]] = field(default_factory=list)

    def missing(self) -> list[str]:
        """The task's required slots without a value."""
        return [] if self.intent is None else [s for s in SCHEMAS[self.intent].required if s not in self.slots]

    def needs_confirmation(self) -> bool:
        if self.intent is None or not SCHEMAS[self.intent].confirm:
            return False
        return not all(self.slots[s].confirmed for s in SCHEMAS[self.intent].slots if s in self.slots)

    def fill(self, values: dict[str, str], source: str, turn: int) -> list[str]:
        """Set slot values; a changed value is no longer confirmed. Returns the slots that changed."""
        changed = []
        for name, value in values.items():
            old = self.slots.get(name)
            if old is None or old.value != value:
                self.slots[name] = Slot(value, source, turn)
                changed.append(name)
        return changed

    def confirm(self) -> None:
        for name in SCHEMAS[self.intent].slots if self.intent else ():
            if name in self.slots:
                self.slots[name].confirmed = True

    def start(self, intent: str) -> None:
        """Take up ``intent`` as the task; values already known carry over but need confirming again."""
        if intent != self.intent:
            self.intent, self.awaiting = intent, None
            for slot in self.slots.values():
                slot.confirmed = False

    def task_values(self) -> dict[str, str]:
        return {s: self.slots[s].value for s in SCHEMAS[self.intent].slots if s in self.slots} if self.intent else {}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DialogueState:
        return cls(**{**raw, "slots": {k: Slot(**v) for k, v in raw.get("slots", {}).items()}})
