"""Slot values read by the model: the message and the wanted slot names in, a JSON object out, its
shape enforced by the engine's structured output (``SamplingParams(structured=StructuredOutputs(json=schema))``),
so the answer always parses. A small model still invents values, so a value is kept only if it
appears in the customer's message (grounding); the rules (:mod:`.slots`) take precedence.
"""

from __future__ import annotations

import json

from r1kit.apps.support.slots import SLOT_WORDS
from r1kit.infer.sampling import SamplingParams, StructuredOutputs

MAX_VALUE_CHARS = 80
TOKENS_PER_SLOT = 32


def schema(slots: list[str]) -> dict:
    """A JSON schema with one string-or-null property per slot, all required, nothing else."""
    value = {"anyOf": [{"type": "string", "maxLength": MAX_VALUE_CHARS}, {"type": "null"}]}
    return {"type": "object", "properties": {s: value for s in slots}, "required": list(slots), "additionalProperties": False}


def grounded(value: str, message: str) -> bool:
    value = value.strip()
    return len(value) >= 2 and value.lower() in message.lower()


async def extract(generator, message: str, slots: list[str]) -> dict[str, str]:
    """The values of ``slots`` the model finds in ``message`` (only those found verbatim in it)."""
    if not slots:
        return {}
    fields = ", ".join(f"{s} ({SLOT_WORDS.get(s, (s,))[0]})" for s in slots)
    messages = [
        {"role": "system", "content": f"Extract {fields} from the customer's message as JSON. Use null for anything not in the message."},
        {"role": "user", "content": message},
    ]
    # thinking_budget=0: a reasoning model closes </think> at once, and the grammar governs the answer
    # (the generator drops it for a model that does not reason)
    params = SamplingParams(temperature=0.0, max_tokens=8 + TOKENS_PER_SLOT * len(slots), thinking_budget=0,
                            structured=StructuredOutputs(json=schema(slots)))
    text = await generator.chat(messages, params)
    try:
        data = json.loads(text)
    except json.JSONDecodeError:  # cut off by max_tokens before the object closed: nothing usable
        return {}
    return {k: v.strip() for k, v in data.items() if k in slots and isinstance(v, str) and grounded(v, message)}
