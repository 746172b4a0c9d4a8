"""`claims.md` and `claims.html`: one row per claim of the guide, built only from the metric files.

For each claim: the guide's figure, r1kit's measured figure, the method and scale, the verdict
(holds / does not hold at this scale / cannot be measured here) and why. An experiment whose file
is missing shows "not run yet"; one that failed shows its error. No number is ever carried over
from elsewhere: delete or change a metric file and the report changes with it. Plots (perplexity
by position per attention kind, prefill time by length, sparsity against quality) are drawn from
the same files. This module must never run an experiment.
"""

from __future__ import annotations

import html
import os
import platform
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from r1kit.claims.registry import EXPERIMENTS  # noqa: E402
from r1kit.claims.results import FAILED, NOT_RUN, Claim, Verdict, read_metrics  # noqa: E402
from r1kit.config import write_text_atomic  # noqa: E402
from r1kit.report import _save  # noqa: E402

HEADER = ("§", "claim", "guide", "r1kit measured", "method and scale", "verdict", "why")


def claim_rows(out: Path) -> list[tuple[Claim, Verdict]]:
    """Every claim with its verdict, read from the metric files of ``out``."""
    rows = []
    for name, module in EXPERIMENTS.items():
        record = read_metrics(out, name)
        if record is None:
            verdicts = {c.key: Verdict("—", "—", NOT_RUN, f"no metric file yet: run `r1kit claims --only {name}`") for c in module.CLAIMS}
        elif record["status"] == "failed":
            verdicts = {c.key: Verdict("—", "—", FAILED, f"{name} failed ({record['finished']}): {record['error']}") for c in module.CLAIMS}
        else:
            try:
                verdicts = module.verdicts(record["result"])
            except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
                verdicts = {c.key: Verdict("—", "—", FAILED, f"metrics/{name}.json lacks a figure the verdict needs: {exc!r}") for c in module.CLAIMS}
        rows += [(claim, verdicts[claim.key]) for claim in module.CLAIMS]
    return rows


def _result(out: Path, name: str) -> dict[str, Any] | None:
    record = read_metrics(out, name)
    return record["result"] if record is not None and record["status"] == "ok" else None


def plot_attention(result: dict[str, Any], out: Path) -> list[tuple[str, str]]:
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, variant in result["variants"].items():
        runs = variant["runs"]
        buckets = runs[0]["by_position"]
        means = [sum(r["by_position"][i]["ppl"] for r in runs) / len(runs) for i in range(len(buckets))]
        ax.plot([f"{b['from']}-{b['to']}" for b in buckets], means, "o-", label=f"{name} ({variant['ppl']['mean']:.2f})")
    _save(fig, ax, out / "attention_by_position.png", "token positions", "perplexity (mean over seeds)",
          "Held-out perplexity by position, per attention kind", {"fontsize": 8})  # fmt: skip
    fig, ax = plt.subplots(figsize=(7, 4))
    lengths = sorted(result["speed"], key=int)
    for name in result["variants"]:
        ax.plot([int(n) for n in lengths], [result["speed"][n][name]["prefill"] for n in lengths], "o-", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    _save(fig, ax, out / "attention_speed.png", "tokens", "prefill ms (median)", "Prefill time by length", {"fontsize": 8})
    return [("Perplexity by position per attention kind", "attention_by_position.png"), ("Prefill time by length", "attention_speed.png")]


def plot_sparsity(result: dict[str, Any], out: Path) -> list[tuple[str, str]]:
    fig, ax = plt.subplots(figsize=(7, 4))
    models = result["models"]
    fixed = sorted((row["sparsity"], row["accuracy_ratio"]) for row in models.values() if row["kind"] in ("dense", "fixed"))
    ax.plot([s for s, _ in fixed], [a for _, a in fixed], "o-", label="dense (0) and Top-K at fixed sparsity")
    for name, row in models.items():
        if row["kind"] == "controller":
            ax.plot([row["sparsity"]], [row["accuracy_ratio"]], "^", label="Top-K, adaptive controller (sparsity reached)")
        elif row["kind"] == "pruned":
            kept = row["non_embedding_parameters"] / result["dense_non_embedding_parameters"]
            ax.plot([1 - kept], [row["accuracy_ratio"]], "s", label=f"{name} (share of parameters removed)")
    ax.axhline(0.98, color="grey", ls="--", lw=1, label="guide: 98% of accuracy")
    _save(fig, ax, out / "sparsity_quality.png", "sparsity / share of FFN parameters removed", "next-token accuracy / dense",
          "Sparsity against quality", {"fontsize": 8})  # fmt: skip
    return [("Sparsity against quality", "sparsity_quality.png")]


def _plots(out: Path) -> list[tuple[str, str]]:
    images = []
    for name, draw in (("attention", plot_attention), ("sparsity", plot_sparsity)):
        result = _result(out, name)
        if result is not None:
            try:
                images += draw(result, out)
            except (KeyError, TypeError, ValueError, IndexError):
                continue  # the table row already names the problem with this file
    return images


def _experiments(out: Path) -> list[tuple[str, str]]:
    lines = []
    for name in EXPERIMENTS:
        record = read_metrics(out, name)
        if record is None:
            lines.append((name, "not run yet"))
        else:
            scale = record.get("scale") or {}
            state = (f"{record['status']}, {record['seconds']:.0f} s, finished {record['finished']}, "
                     f"{scale.get('tier', '?')} scale ({scale.get('budget_minutes', '?')} min budget)")  # fmt: skip
            lines.append((name, state))
    return lines


def write_report(out: Path) -> list[str]:
    """Write ``claims.md``, ``claims.html`` and their plots into ``out``; returns the file names."""
    out = Path(out)
    rows = claim_rows(out)
    images = _plots(out)
    table = [(c.section, c.statement, c.figure, v.measured, v.method, v.verdict, v.why) for c, v in rows]
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    intro = (f"Every figure the guide states, measured by r1kit at the scale this machine allows (report written {when}; {machine}). "
             "Built only from the metric files under metrics/: rerun `r1kit claims` to measure again.")  # fmt: skip
    experiments = _experiments(out)
    cell = lambda text: str(text).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    md = ["# r1kit claims: the guide's figures, measured", "", intro, "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    md += ["| " + " | ".join(cell(c) for c in row) + " |" for row in table]
    md += ["", "## Experiments", "", "| experiment | state |", "|---|---|"] + [f"| {a} | {cell(b)} |" for a, b in experiments] + [""]
    md += [f"## {title}\n\n![{title}]({name})\n" for title, name in images]
    write_text_atomic(out / "claims.md", "\n".join(md) + "\n")

    esc = html.escape
    body = "".join(f"<tr class=\"{esc(row[5].split()[0])}\">" + "".join(f"<td>{esc(str(c))}</td>" for c in row) + "</tr>" for row in table)
    states = "".join(f"<tr><td>{esc(a)}</td><td>{esc(b)}</td></tr>" for a, b in experiments)
    figures = "".join(f'<figure><img src="{esc(name)}" alt="{esc(title)}"><figcaption>{esc(title)}</figcaption></figure>' for title, name in images)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>r1kit claims</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1300px;margin:2em auto;padding:0 1em}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 8px;vertical-align:top;font-size:14px}}
tr.holds td:nth-child(6){{background:#dfd}}tr.does td:nth-child(6),tr.experiment td:nth-child(6){{background:#fdd}}
tr.cannot td:nth-child(6),tr.not td:nth-child(6){{background:#eee}}figure{{display:inline-block;margin:0.5em}}img{{max-width:600px}}</style>
</head><body><h1>r1kit claims: the guide's figures, measured</h1><p>{esc(intro)}</p>
<table><tr>{"".join(f"<th>{esc(h)}</th>" for h in HEADER)}</tr>{body}</table>
<h2>Experiments</h2><table><tr><th>experiment</th><th>state</th></tr>{states}</table>
{figures}
</body></html>
"""
    write_text_atomic(out / "claims.html", page)
    return ["claims.md", "claims.html"] + [name for _, name in images]
