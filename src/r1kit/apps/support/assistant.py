"""One turn of the assistant, end to end: recognise the intent, read the message in the context of the
conversation (an answer to the question just asked, a yes or no to a confirmation, a correction, a
new task), fill slots by rules and by the model's JSON extraction, let the policy decide, run the
action, have the model write the reply, and save the session.

Everything that computes runs off the event loop (the recogniser and SQLite on a thread, the model's
words on the engine), and one session's turns run one at a time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from r1kit.apps.support import extraction, policy, reply
from r1kit.apps.support.actions import Action, ActionResult
from r1kit.apps.support.config import SupportConfig
from r1kit.apps.support.dialogue import Session, Turn, language
from r1kit.apps.support.intent import IntentRecognizer, IntentResult
from r1kit.apps.support.slots import SCHEMAS, extract, says_no, says_yes
from r1kit.apps.support.state import DialogueState
from r1kit.apps.support.store import SessionStore
from r1kit.errors import ConfigError
from r1kit.infer.sampling import SamplingParams


class Assistant:
    def __init__(self, config: SupportConfig, recognizer: IntentRecognizer, generator, actions: Sequence[Action], store: SessionStore,
                 catalogue: dict[str, str] | None = None) -> None:  # fmt: skip
        self.config, self.recognizer, self.generator, self.store = config, recognizer, generator, store
        self.actions = {a.intent: a for a in actions}
        self.catalogue = catalogue or {}
        self._locks: dict[str, asyncio.Lock] = {}

    def check_message(self, text: str) -> str:
        if not text.strip():
            raise ConfigError("content is empty: send the customer's message", param="content")
        if len(text) > self.config.max_message_chars:
            raise ConfigError(f"content has {len(text)} characters; at most {self.config.max_message_chars} are accepted", param="content")
        return text.strip()

    async def create(self) -> Session:
        return await asyncio.to_thread(self.store.create)

    async def load(self, session_id: str) -> Session:
        return await asyncio.to_thread(self.store.load, session_id)

    async def respond(self, session_id: str, text: str) -> dict[str, Any]:
        """Handle one customer message; returns the reply with how it was read and what was done."""
        text = self.check_message(text)
        async with self._locks.setdefault(session_id, asyncio.Lock()):
            start = time.perf_counter()
            session = await self.load(session_id)
            (result,) = await asyncio.to_thread(self.recognizer.recognize, [text])
            recognized = time.perf_counter()
            state, number = session.state, session.turn_count + 1
            intent, unclear, given = self._read(state, result, text, number)
            if state.intent is not None and state.missing() and not state.handed_over:
                found = await extraction.extract(self.generator, text, [s for s in state.missing() if s not in given])
                state.fill(found, "model", number)
                given.update(found)
            decision = policy.decide(state, intent, unclear, self.config.low_confidence_handover, self.config.complaint_handover)
            outcome = await asyncio.to_thread(self._apply, decision, state, number)
            lang = language(text)
            chat = reply.messages(decision, session, outcome, text, lang, self.config.max_turns)
            decided = time.perf_counter()
            words = await self.generator.chat(chat, SamplingParams(temperature=self.config.temperature, max_tokens=self.config.max_new_tokens))
            replied = time.perf_counter()
            action = state.actions[-1] if outcome is not None else None
            session.record(Turn(text, words, intent, result.confidence, decision.kind, given, action), self.config.max_turns)
            await asyncio.to_thread(self.store.save, session)
        return {
            "session_id": session.id, "turn": number, "reply": words, "intent": intent, "confidence": result.confidence,
            "recognized": result.to_dict(), "decision": decision.to_dict(), "action": action, "slots": {k: v.value for k, v in state.slots.items()},
            "state": state.to_dict(),
            "timings_ms": {"intent": 1e3 * (recognized - start), "decision": 1e3 * (decided - start), "reply": 1e3 * (replied - decided),
                           "total": 1e3 * (replied - start)},
        }  # fmt: skip

    def _read(self, state: DialogueState, result: IntentResult, text: str, number: int) -> tuple[str, bool, dict[str, str]]:
        """This message's intent in context, whether it stayed unclear, and the slot values it gave;
        updates the task, its slots and the hand-over counters."""
        given = extract(text, state.awaiting, self.catalogue)
        intent, predicted_task = result.intent, result.intent in SCHEMAS
        yes, no = intent == "affirm" or says_yes(text), intent == "deny" or says_no(text)
        task_values = {k: v for k, v in given.items() if state.intent and k in SCHEMAS[state.intent].slots}
        in_context = True
        if state.awaiting == "confirm" and (task_values or ((yes or no) and not predicted_task)):
            if task_values:  # "no, the address is ..." or a new value: a correction, confirmed again
                state.fill(task_values, "rule", number)
            elif no:  # "no" alone: ask again for the value most likely wrong
                state.slots.pop(SCHEMAS[state.intent].required[-1], None)
            else:
                state.confirm()
            intent = state.intent
        elif state.awaiting not in (None, "confirm") and task_values:  # the answer to our question
            state.fill(task_values, "rule", number)
            intent = state.intent
        elif predicted_task:
            state.start(intent)
            state.fill({k: v for k, v in given.items() if k in SCHEMAS[intent].slots}, "rule", number)
        elif state.intent is None and state.last_task and any(k in SCHEMAS[state.last_task].required[1:] for k in given):
            intent = state.last_task  # a correction after the task ran ("sorry, the street is ..."): run it again
            state.start(intent)
            state.fill({k: v for k, v in given.items() if k in SCHEMAS[intent].slots}, "rule", number)
        else:
            in_context = False
            state.fill({k: v for k, v in given.items() if k in ("order_id", "email")}, "rule", number)
        unclear = not in_context and result.confidence < self.recognizer.threshold
        state.low_confidence = state.low_confidence + 1 if unclear else 0
        state.complaints += result.intent == "complaint"
        return intent, unclear, given

    def _apply(self, decision: policy.Decision, state: DialogueState, number: int) -> ActionResult | None:
        """Carry out the decision on the state; returns the action's result when one ran."""
        state.awaiting = None
        if decision.kind == policy.HANDOVER:
            state.handed_over = True
        elif decision.kind == policy.ASK:
            state.awaiting = decision.slot
        elif decision.kind == policy.CONFIRM:
            state.awaiting = "confirm"
        elif decision.kind == policy.ACT:
            values = state.task_values()
            action = self.actions.get(decision.intent)
            result = action.run(values) if action else ActionResult(False, f"nothing here handles {decision.intent}")
            state.actions.append({"intent": decision.intent, "slots": values, "ok": result.ok, "message": result.message, "turn": number})
            state.last_task, state.intent = decision.intent, None
            return result
        return None
