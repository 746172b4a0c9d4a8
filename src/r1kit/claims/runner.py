"""`r1kit claims`' engine: run the experiments within a budget, resumably, then write the report.

Each experiment runs only when its metric file is missing or records a failure; a failure is
written as such (message and traceback tail) and the run goes on to the next experiment. Training
inside an experiment resumes from its checkpoints. The sizes come from :func:`scale_for`; a work
folder made at one scale refuses another, so an interrupted run is never resumed with models of a
different size. This module must never compute a verdict: the report does, from the files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from r1kit.claims import results
from r1kit.claims.registry import EXPERIMENTS
from r1kit.claims.scale import Scale, scale_for
from r1kit.config import dump_json
from r1kit.errors import ConfigError

TRAINED = ("attention", "sparsity")  # the experiments that need the prepared corpus


@dataclasses.dataclass(frozen=True)
class ClaimsConfig:
    """What one ``r1kit claims`` run does."""

    out: str = "runs/claims"
    budget_minutes: float = 60.0
    only: tuple[str, ...] = ()
    support_metrics: str | None = None
    gptq_model: str = "smollm2-135m-instruct"
    device: str = "auto"

    def __post_init__(self) -> None:
        unknown = [name for name in self.only if name not in EXPERIMENTS]
        if unknown:
            raise ConfigError(f"--only {', '.join(unknown)}: unknown experiment(s); choose from {', '.join(EXPERIMENTS)}", param="only")
        if not self.budget_minutes > 0:
            raise ConfigError(f"--budget-minutes={self.budget_minutes} must be positive", param="budget_minutes")

    @property
    def experiments(self) -> tuple[str, ...]:
        return self.only or tuple(EXPERIMENTS)


def check_scale(out: Path, scale: Scale) -> None:
    """Record the run's scale in ``work/scale.json``; refuse to resume a work folder made at another scale."""
    file = out / "work" / "scale.json"
    current = dataclasses.asdict(scale)
    if file.is_file():
        before = json.loads(file.read_text())
        if before.get("tier") != scale.tier or before.get("budget_minutes") != scale.budget_minutes:
            raise ConfigError(
                f"{out / 'work'} holds a run at --budget-minutes {before.get('budget_minutes')} ({before.get('tier')} scale); this run asks "
                f"for {scale.budget_minutes} ({scale.tier}). Resume with the same budget, or choose another --out", param="budget_minutes")
        return
    file.parent.mkdir(parents=True, exist_ok=True)
    dump_json(current, file)


def run_experiment(name: str, config: ClaimsConfig, scale: Scale, shards: Callable[[], Path], device, log) -> dict[str, Any]:
    """Run one experiment and return its result (raises on failure)."""
    out = Path(config.out)
    module = EXPERIMENTS[name]
    if name in TRAINED:
        return module.run(out, scale, shards(), device, log)
    if name == "gptq":
        return module.run(out, scale, device, log, model=config.gptq_model)
    if name == "intent":
        return module.run(Path(config.support_metrics) if config.support_metrics else None, log)
    return module.run(scale, log)


def run_claims(config: ClaimsConfig, log: Callable[[str], None] = print) -> dict[str, str]:
    """Run every unfinished experiment of ``config``, then write the report; returns each experiment's status."""
    from tqdm import tqdm

    from r1kit.claims.corpus import prepare_shards
    from r1kit.claims.report import write_report
    from r1kit.device import resolve_device

    out = Path(config.out)
    device = resolve_device(config.device, "device")
    scale = scale_for(config.budget_minutes, device.type == "cuda")
    check_scale(out, scale)
    log(f"claims: {scale.tier} scale for {config.budget_minutes:g} min on {device} → {out}")
    prepared: list[Path] = []

    def shards() -> Path:
        if not prepared:
            prepared.append(prepare_shards(out, scale, log))
        return prepared[0]

    statuses = {}
    names = config.experiments
    bar = tqdm(names, desc="claims", unit="experiment", disable=os.environ.get("R1KIT_NO_PROGRESS") == "1")
    for i, name in enumerate(bar, 1):
        bar.set_postfix_str(name)
        if results.is_done(out, name):
            log(f"[{i}/{len(names)}] {name}: done earlier, skipped")
            statuses[name] = "skipped"
            continue
        log(f"[{i}/{len(names)}] {name} ...")
        start = time.perf_counter()
        try:
            result = run_experiment(name, config, scale, shards, device, log)
        except Exception as exc:  # noqa: BLE001 - every failure is recorded in the report, never hidden
            tail = "".join(traceback.format_exception(exc))[-2000:]
            results.write_metrics(out, name, "failed", time.perf_counter() - start, dataclasses.asdict(scale),
                                  {"error": f"{type(exc).__name__}: {exc}", "traceback": tail})  # fmt: skip
            log(f"[{i}/{len(names)}] {name}: FAILED: {type(exc).__name__}: {exc}")
            statuses[name] = "failed"
            continue
        results.write_metrics(out, name, "ok", time.perf_counter() - start, dataclasses.asdict(scale), {"result": result})
        log(f"[{i}/{len(names)}] {name}: done in {time.perf_counter() - start:.0f} s")
        statuses[name] = "ok"
    bar.close()
    files = write_report(out)
    log(f"report: {out / files[0]} and {out / files[1]}")
    return statuses
