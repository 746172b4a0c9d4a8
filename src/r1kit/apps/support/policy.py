"""The policy: from the tracked state and this message's intent, what the assistant does next —
hand over to a person, ask for a missing slot, confirm values, run the task's action, or answer.

Hand-over happens when the customer asks for a person, after ``low_confidence_handover`` unclear
messages in a row, or after ``complaint_handover`` complaints. The policy only decides; it changes
nothing (the assistant applies the decision).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from r1kit.apps.support.state import DialogueState

HANDOVER, ASK, CONFIRM, ACT, ANSWER, CLARIFY = "handover", "ask", "confirm", "act", "answer", "clarify"


@dataclass(frozen=True)
class Decision:
    kind: str  # one of the names above
    intent: str | None  # the task (ask/confirm/act) or the message's intent (answer)
    slot: str | None = None  # ask: the slot wanted
    reason: str = ""  # handover/clarify: why

    def to_dict(self) -> dict:
        return asdict(self)


def decide(state: DialogueState, intent: str, unclear: bool, low_confidence_limit: int, complaint_limit: int) -> Decision:
    """``intent``: this message's intent after the assistant's reading of it in context; ``unclear``:
    its confidence was below the threshold. ``state`` holds the counters already updated for it."""
    if state.handed_over:
        return Decision(HANDOVER, intent, reason="already with a person")
    if intent == "human_agent":
        return Decision(HANDOVER, intent, reason="the customer asked for a person")
    if state.low_confidence >= low_confidence_limit:
        return Decision(HANDOVER, intent, reason=f"{state.low_confidence} unclear messages in a row")
    if state.complaints >= complaint_limit:
        return Decision(HANDOVER, intent, reason=f"{state.complaints} complaints")
    if state.intent is not None:
        missing = state.missing()
        if missing:
            return Decision(ASK, state.intent, slot=missing[0])
        if state.needs_confirmation():
            return Decision(CONFIRM, state.intent)
        return Decision(ACT, state.intent)
    if unclear:
        return Decision(CLARIFY, intent, reason="the message was unclear")
    return Decision(ANSWER, intent)
