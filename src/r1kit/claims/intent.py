"""Claim §5.1: the customer-service application recognises intents with 98.7% accuracy and replies
in under 200 ms.

The measurement belongs to the application's own benchmark (``benchmarks/bench_support.py``, over
``r1kit.apps.support``). Its contract with this report: it writes ``metrics.json`` (default
``runs/bench-support/metrics.json``) holding ``intent_accuracy`` (a fraction), ``examples`` (how
many were scored), ``latency_ms`` with ``p50`` and ``p95`` (one full reply, request to last token),
and optionally ``domain``, ``model`` and ``device``. This experiment copies those figures into its
own metric file, with the source's path and time, or records why there are none: the application
is not built yet, or its benchmark has not been run.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path
from typing import Any, Callable

from r1kit.claims.results import CANNOT_MEASURE, DOES_NOT_HOLD, HOLDS, Claim, Verdict, ratio_text
from r1kit.errors import CheckpointError

NAME = "intent"
APP = "r1kit.apps.support"
DEFAULT_METRICS = Path("runs/bench-support/metrics.json")
CLAIMS = (Claim("intent_accuracy", "5.1", "Customer-service application: intent recognition accuracy (finance)", "98.7%"),
          Claim("reply_latency", "5.1", "Customer-service application: response time", "under 200 ms"))  # fmt: skip


def _app_exists() -> bool:
    try:
        return importlib.util.find_spec(APP) is not None
    except ModuleNotFoundError:  # r1kit.apps itself is missing
        return False


def read_app_metrics(path: Path) -> dict[str, Any]:
    """The app benchmark's figures, checked against the contract above."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        accuracy, examples = float(raw["intent_accuracy"]), int(raw["examples"])
        p50, p95 = float(raw["latency_ms"]["p50"]), float(raw["latency_ms"]["p95"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} does not follow the support benchmark's metrics contract "
                              f"(intent_accuracy, examples, latency_ms.p50/p95): {exc!r}") from exc  # fmt: skip
    extra = {k: raw[k] for k in ("domain", "model", "device") if k in raw}
    return {"intent_accuracy": accuracy, "examples": examples, "latency_ms": {"p50": p50, "p95": p95}, **extra}


def run(metrics_file: Path | None, log: Callable[[str], None]) -> dict[str, Any]:
    """Copy the app benchmark's figures, or record why there are none."""
    path = Path(metrics_file or DEFAULT_METRICS)
    if path.is_file():
        log(f"intent: reading {path}")
        mtime = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(path.stat().st_mtime))
        return {"state": "measured", "source": str(path.resolve()), "source_time": mtime, **read_app_metrics(path)}
    if _app_exists():
        return {"state": "not run", "source": str(path), "reason": f"the support app exists but its benchmark has not written {path}: "
                "run `python benchmarks/bench_support.py`, then `r1kit claims --only intent`"}  # fmt: skip
    return {"state": "not built", "reason": f"not built yet: {APP} does not exist in this checkout"}


def verdicts(result: dict[str, Any]) -> dict[str, Verdict]:
    if result["state"] != "measured":
        empty = Verdict(measured="—", method="the support app's benchmark", verdict=CANNOT_MEASURE, why=result["reason"])
        return {"intent_accuracy": empty, "reply_latency": empty}
    where = f"{result['examples']} examples" + (f", {result['domain']}" if "domain" in result else "") + (f", {result['model']}" if "model" in result else "")
    method = f"benchmarks/bench_support.py ({where}); figures copied from {result['source']} ({result['source_time']})"
    latency = result["latency_ms"]
    return {
        "intent_accuracy": Verdict(measured=ratio_text(result["intent_accuracy"]), method=method,
                                   verdict=HOLDS if result["intent_accuracy"] >= 0.987 else DOES_NOT_HOLD,
                                   why="accuracy of the app's intent recogniser on its labelled set"),
        "reply_latency": Verdict(measured=f"p50 {latency['p50']:.0f} ms, p95 {latency['p95']:.0f} ms", method=method,
                                 verdict=HOLDS if latency["p95"] < 200 else DOES_NOT_HOLD,
                                 why="judged on the 95th percentile: most replies, not the median, must be under 200 ms"
                                     + (f" on {result['device']}" if "device" in result else "")),
    }  # fmt: skip
