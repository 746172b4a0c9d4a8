"""The metric files: what an experiment leaves behind, and the claims and verdicts read from them.

Each experiment writes ``<out>/metrics/<name>.json`` atomically once it finishes, and only then:
``{"experiment", "status": "ok" | "failed", "finished", "seconds", "scale", "result" | "error"}``.
A file with status ``ok`` marks the experiment done (a re-run skips it); a ``failed`` one is run
again. The report reads these files and nothing else, so every number it shows is one a run
measured. This module must never measure anything.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from r1kit.config import dump_json
from r1kit.errors import CheckpointError

HOLDS = "holds"
DOES_NOT_HOLD = "does not hold at this scale"
CANNOT_MEASURE = "cannot be measured here"
FAILED = "experiment failed"
NOT_RUN = "not run yet"


@dataclasses.dataclass(frozen=True)
class Claim:
    """One figure the guide states."""

    key: str
    section: str
    statement: str  # what the guide says, in English
    figure: str  # the guide's number as it states it


@dataclasses.dataclass(frozen=True)
class Verdict:
    """r1kit's answer to one claim, built from one metric file."""

    measured: str
    method: str
    verdict: str
    why: str


def metrics_path(out: Path, experiment: str) -> Path:
    return Path(out) / "metrics" / f"{experiment}.json"


def write_metrics(out: Path, experiment: str, status: str, seconds: float, scale: dict[str, Any], payload: dict[str, Any]) -> Path:
    """Write an experiment's metric file atomically; ``payload`` is ``{"result": ...}`` or ``{"error": ...}``."""
    path = metrics_path(out, experiment)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"experiment": experiment, "status": status, "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              "seconds": round(seconds, 1), "scale": scale, **payload}  # fmt: skip
    dump_json(record, path)
    return path


def read_metrics(out: Path, experiment: str) -> dict[str, Any] | None:
    """The experiment's metric file, or None when it has not finished (no file yet)."""
    path = metrics_path(out, experiment)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}): delete it and run `r1kit claims --only {experiment}` again") from exc
    if record.get("status") not in ("ok", "failed") or ("result" not in record and "error" not in record):
        raise CheckpointError(f"{path} is not a claims metric file (no status/result): delete it and rerun `r1kit claims --only {experiment}`")
    return record


def is_done(out: Path, experiment: str) -> bool:
    record = read_metrics(out, experiment)
    return record is not None and record["status"] == "ok"


def ratio_text(value: float | None, digits: int = 1) -> str:
    """A fraction as a percentage; "n/a" where the ratio has no denominator (None)."""
    return "n/a" if value is None else f"{100 * value:.{digits}f}%"


