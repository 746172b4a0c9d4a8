"""The report of a GRPO run: reward, accuracy and completion-length curves (PNG) and report.html,
from the run's metrics.jsonl and summary.json. It only reads those files; it never trains.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from r1kit.config import write_text_atomic  # noqa: E402

# (file, title, y label, training-batch key, held-out key)
CURVES = (
    ("reward.png", "Reward", "mean reward", "reward_mean", "heldout_reward"),
    ("accuracy.png", "Accuracy", "share correct", "accuracy", "heldout_accuracy"),
    ("length.png", "Completion length", "tokens", "completion_length", "heldout_length"),
)


def read_metrics(out: Path) -> list[dict[str, Any]]:
    file = out / "metrics.jsonl"
    return [json.loads(line) for line in file.read_text().splitlines() if line.strip()] if file.is_file() else []


def plot_curve(metrics: list[dict[str, Any]], file: Path, title: str, ylabel: str, train_key: str, heldout_key: str) -> None:
    """One metric over steps: the training batches' values (with the reward's spread) and the held-out points."""
    fig, ax = plt.subplots(figsize=(7, 4))
    rows = [m for m in metrics if train_key in m]
    steps = [m["step"] for m in rows]
    ax.plot(steps, [m[train_key] for m in rows], label="training batches", alpha=0.8)
    if train_key == "reward_mean" and rows:
        lo = [m["reward_mean"] - m["reward_std"] for m in rows]
        hi = [m["reward_mean"] + m["reward_std"] for m in rows]
        ax.fill_between(steps, lo, hi, alpha=0.15, label="± spread in the batch")
    held = [m for m in metrics if heldout_key in m]
    if held:
        ax.plot([m["step"] for m in held], [m[heldout_key] for m in held], "o-", label="held-out (greedy)")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(file, dpi=110)
    plt.close(fig)


def write_report(out: str | Path) -> Path:
    """Write the curves and ``report.html`` into ``out``; returns the page's path."""
    out = Path(out)
    metrics = read_metrics(out)
    for name, title, ylabel, train_key, heldout_key in CURVES:
        plot_curve(metrics, out / name, title, ylabel, train_key, heldout_key)
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
    esc = html.escape
    rows = "".join(f"<tr><td>{esc(str(k))}</td><td>{esc(_fmt(v))}</td></tr>" for k, v in summary.items())
    figures = "".join(f'<figure><img src="{name}" alt="{esc(title)}"><figcaption>{esc(title)}</figcaption></figure>' for name, title, *_ in CURVES)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>r1kit GRPO report</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}}
table{{border-collapse:collapse;margin:1em 0}}td{{border:1px solid #ccc;padding:4px 8px}}
figure{{display:inline-block;margin:0.5em}}img{{max-width:520px}}</style>
</head><body><h1>r1kit GRPO report</h1>
<table>{rows}</table>
{figures}
</body></html>
"""
    return write_text_atomic(out / "report.html", page)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
