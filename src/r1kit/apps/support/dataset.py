"""The labelled intent set: the bilingual (Chinese/English) online-shop set shipped with r1kit, or a
user's own JSONL with the same fields (``text``, ``intent``, optional ``lang`` and ``split``).

The shipped set has a fixed train/test split (the ``split`` field); ``data/README.md`` says how it was
written. Reading never changes a record: the split a test reports on is the split in the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from r1kit.errors import ConfigError

OUT_OF_SCOPE = "out_of_scope"
SPLITS = ("train", "test")


@dataclass(frozen=True)
class Example:
    text: str
    intent: str
    lang: str = ""
    split: str = "train"


def shipped_path() -> Path:
    """The shipped ``intents.jsonl`` (package data)."""
    return Path(str(resources.files("r1kit.apps.support") / "data" / "intents.jsonl"))


def load_examples(path: str | Path | None = None) -> list[Example]:
    """Every record of ``path`` (default: the shipped set), checked: a bad line names its number."""
    path = Path(path) if path is not None else shipped_path()
    if not path.is_file():
        raise ConfigError(f"{path}: no such intent data file; give a JSONL file with one {{\"text\", \"intent\"}} object per line", param="--data")
    examples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{number}: not valid JSON ({exc.msg})", param="--data") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str) or not isinstance(record.get("intent"), str):
            raise ConfigError(f"{path}:{number}: each line needs string fields \"text\" and \"intent\"", param="--data")
        if not record["text"].strip() or not record["intent"].strip():
            raise ConfigError(f"{path}:{number}: \"text\" and \"intent\" must not be empty", param="--data")
        split = record.get("split", "train")
        if split not in SPLITS:
            raise ConfigError(f"{path}:{number}: split={split!r} must be one of {', '.join(SPLITS)}", param="--data")
        examples.append(Example(record["text"], record["intent"], str(record.get("lang", "")), split))
    if not examples:
        raise ConfigError(f"{path} holds no examples", param="--data")
    return examples


def split(examples: list[Example], name: str) -> list[Example]:
    """The examples of one split (``train`` or ``test``)."""
    if name not in SPLITS:
        raise ConfigError(f"split {name!r} must be one of {', '.join(SPLITS)}", param="--split")
    return [e for e in examples if e.split == name]


def labels_of(examples: list[Example]) -> list[str]:
    """The sorted intent names (the order of a head's outputs)."""
    return sorted({e.intent for e in examples})
