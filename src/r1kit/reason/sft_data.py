"""Chats to training rows: the checkpoint's chat template, loss on assistant tokens only, and packing
that keeps documents apart.

A record is ``{"messages": [{"role", "content"}, ...]}`` or ``{"prompt", "completion"}`` (a user
turn and an assistant turn). The assistant spans are found by rendering the chat incrementally: the
text up to assistant turn ``i`` with the generation prompt, then through turn ``i``; the characters
of the second after the two part are that turn (its end-of-turn token included, so the model learns to stop), and a
token carries loss when it starts inside one. A template whose render of a shorter chat is not a
prefix of the longer one's (it rewrites earlier turns) cannot be split this way and is refused.

Each document becomes (inputs, targets) with targets -100 where there is no loss; packing puts
documents side by side into rows of ``seq_len`` (first-fit, longest first), each with its own
positions from 0 and a document id, for :class:`~r1kit.reason.document_attention.DocumentAttention`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch

from r1kit.chat_template import ChatTemplate
from r1kit.errors import ConfigError

IGNORE = -100


@dataclasses.dataclass
class Document:
    """One chat as next-token pairs: ``inputs[j]`` predicts ``targets[j]`` (``IGNORE``: no loss)."""

    inputs: list[int]
    targets: list[int]


def read_chats(path: str | Path) -> list[list[dict[str, str]]]:
    """The chats of a JSONL file (``messages`` records, or ``prompt``/``completion`` ones)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"SFT data {path} does not exist: give a JSONL of chats (messages, or prompt/completion)", param="--data")
    chats = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            chats.append(chat_of(json.loads(line)))
        except (json.JSONDecodeError, ConfigError) as exc:
            raise ConfigError(f"{path}:{n}: {exc}") from None
    if not chats:
        raise ConfigError(f"{path} holds no chats")
    return chats


def chat_of(record: Any) -> list[dict[str, str]]:
    """A record's messages: its ``messages``, or the user ``prompt`` and assistant ``completion``."""
    if isinstance(record, dict) and "messages" in record:
        messages = record["messages"]
    elif isinstance(record, dict) and "prompt" in record and "completion" in record:
        messages = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]
    else:
        raise ConfigError("a record needs `messages` (a list of {role, content}) or `prompt` and `completion`")
    if not isinstance(messages, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages):
        raise ConfigError("`messages` must be a list of {\"role\": str, \"content\": str}")
    if not any(m["role"] == "assistant" for m in messages):
        raise ConfigError("the chat has no assistant turn, so nothing to learn from")
    return messages


def assistant_spans(messages: list[dict[str, str]], template: ChatTemplate) -> tuple[str, list[tuple[int, int]]]:
    """The rendered chat and the character spans [start, end) of its assistant turns."""
    text = template.render(messages, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = template.render(messages[:i], add_generation_prompt=True)
        through = template.render(messages[: i + 1], add_generation_prompt=False)
        if not text.startswith(through):
            raise ConfigError(
                "the chat template renders earlier turns differently once later ones follow, so the assistant "
                "tokens cannot be located; use a template that only appends (ChatML-like) for SFT"
            )
        # the turn starts where the two renders part: R1's generation prompt adds "<think>\n", which a
        # rendered assistant turn (its reasoning dropped) does not have
        start = len(os.path.commonprefix([before, through]))
        spans.append((start, len(through)))
    return text, spans


def encode_chat(messages: list[dict[str, str]], template: ChatTemplate, tokenizer) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered chat and, per token, whether it belongs to an assistant turn."""
    text, spans = assistant_spans(messages, template)
    encoding = tokenizer.encode(text, add_special_tokens=False)
    loss = [any(lo <= start < hi for lo, hi in spans) for start, _ in encoding.offsets]
    return list(encoding.ids), loss


def to_document(ids: list[int], loss: list[bool], max_len: int) -> Document | None:
    """Next-token pairs of a chat cut to ``max_len`` inputs; None when no target carries loss."""
    ids, loss = ids[: max_len + 1], loss[: max_len + 1]
    targets = [t if keep else IGNORE for t, keep in zip(ids[1:], loss[1:])]
    if all(t == IGNORE for t in targets):
        return None
    return Document(ids[:-1], targets)


def build_documents(chats: list[list[dict[str, str]]], template: ChatTemplate, tokenizer, seq_len: int) -> tuple[list[Document], int]:
    """(documents, how many chats were dropped because truncation left no assistant token)."""
    docs, dropped = [], 0
    for chat in chats:
        doc = to_document(*encode_chat(chat, template, tokenizer), seq_len)
        if doc is None:
            dropped += 1
        else:
            docs.append(doc)
    return docs, dropped


@dataclasses.dataclass
class Rows:
    """Training rows [N, seq_len]: ``inputs``, ``targets`` (``IGNORE`` off-loss and on padding),
    ``positions`` (from 0 in each document) and ``documents`` (id within the row, -1 on padding)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    positions: torch.Tensor
    documents: torch.Tensor

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def select(self, index) -> Rows:
        return Rows(self.inputs[index], self.targets[index], self.positions[index], self.documents[index])


def pack(documents: list[Document], seq_len: int, packing: bool = True) -> Rows:
    """Rows of ``seq_len``: several documents per row (first-fit, longest first) with ``packing``,
    else one per row."""
    bins: list[list[Document]] = []
    space: list[int] = []
    for doc in sorted(documents, key=lambda d: -len(d.inputs)) if packing else documents:
        fit = next((i for i, free in enumerate(space) if free >= len(doc.inputs)), None) if packing else None
        if fit is None:
            bins.append([doc])
            space.append(seq_len - len(doc.inputs))
        else:
            bins[fit].append(doc)
            space[fit] -= len(doc.inputs)
    n = len(bins)
    inputs = torch.zeros(n, seq_len, dtype=torch.long)
    targets = torch.full((n, seq_len), IGNORE, dtype=torch.long)
    positions = torch.zeros(n, seq_len, dtype=torch.long)
    ids = torch.full((n, seq_len), -1, dtype=torch.long)
    for row, docs in enumerate(bins):
        at = 0
        for k, doc in enumerate(docs):
            span = slice(at, at + len(doc.inputs))
            inputs[row, span] = torch.tensor(doc.inputs)
            targets[row, span] = torch.tensor(doc.targets)
            positions[row, span] = torch.arange(len(doc.inputs))
            ids[row, span] = k
            at += len(doc.inputs)
    return Rows(inputs, targets, positions, ids)
