"""The quickstart's report: PNG plots and tables in report.md and report.html, from the files the
stages wrote (state.json, train/metrics.jsonl, data/report.json, data/lengths.png). It only reads
those files; it never reruns a stage.
"""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _metrics(out: Path) -> list[dict[str, Any]]:
    file = out / "train" / "metrics.jsonl"
    return [json.loads(line) for line in file.read_text().splitlines() if line.strip()] if file.is_file() else []


def _save(fig, ax, file: Path, xlabel: str, ylabel: str, title: str, legend: dict[str, Any] | None) -> None:
    """Label, grid, legend (None: none), write and close: the finish every plot here shares."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if legend is not None:
        ax.legend(**legend)
    fig.tight_layout()
    fig.savefig(file, dpi=110)
    plt.close(fig)


def plot_loss(metrics: list[dict[str, Any]], file: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([m["step"] for m in metrics], [m["loss"] for m in metrics], label="train loss")
    val = [m for m in metrics if "val_loss" in m]
    if val:
        ax.plot([m["step"] for m in val], [m["val_loss"] for m in val], "o-", label="validation loss")
    _save(fig, ax, file, "step", "cross-entropy (nats)", "Training loss", {})


def plot_sparsity(metrics: list[dict[str, Any]], file: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    rows = [m for m in metrics if "sparsity" in m]
    for layer in sorted({k for m in rows for k in m["sparsity"]}, key=int):
        ax.plot([m["step"] for m in rows], [m["sparsity"][layer] for m in rows], label=f"layer {layer}")
    _save(fig, ax, file, "step", "sparsity (share of FFN neurons off)", "Top-K sparsity per layer (adaptive controller)",
          {"fontsize": 8} if rows else None)


def plot_perplexity(evaluation: dict[str, Any], file: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, result in evaluation.items():
        buckets = result["by_position"]
        ax.plot([f"{b['from']}-{b['to']}" for b in buckets], [b["ppl"] for b in buckets], "o-", label=f"{name} ({result['ppl']:.2f})")
    _save(fig, ax, file, "token positions", "perplexity", "Held-out perplexity by position", {})


def write_report(out: Path) -> list[str]:
    """Write report.md, report.html and their PNGs into ``out``; returns the file names."""
    state = json.loads((out / "state.json").read_text())["done"]
    metrics = _metrics(out)
    train, evaluation = state["train"]["result"], state["evaluate"]["result"]
    quant, gen = state["quantize"]["result"], state["generate"]["result"]
    plot_loss(metrics, out / "loss.png")
    plot_sparsity(metrics, out / "sparsity.png")
    plot_perplexity(evaluation, out / "perplexity.png")
    if (out / "data" / "lengths.png").is_file():
        shutil.copyfile(out / "data" / "lengths.png", out / "lengths.png")
    fp32 = quant["bytes"]["fp32"]
    table = [
        (name, f"{evaluation[name]['ppl']:.3f}", f"{quant['bytes'][name] / 2**20:.2f} MiB", f"{100 * quant['bytes'][name] / fp32:.1f}%", f"{gen['tokens_per_s'][name]:.1f}")
        for name in ("fp32", "gptq", "rtn")
    ]
    stages = [(name, f"{info['seconds']:.1f} s") for name, info in state.items()]
    summary = (
        f"Trained {train['steps']} steps ({train['tokens']:,} tokens) in {train['elapsed_s'] / 60:.1f} min: validation perplexity "
        f"{train['val_ppl']:.2f}, against {train['unigram_ppl']:.1f} for the unigram baseline (token frequencies alone). "
        f"GPTQ and RTN are 4-bit with group size {quant['group_size']}."
    )
    images = [("Training loss", "loss.png"), ("Top-K sparsity per layer", "sparsity.png"), ("Perplexity by position", "perplexity.png"), ("Document lengths", "lengths.png")]
    images = [(title, name) for title, name in images if (out / name).is_file()]
    header = ("model", "perplexity", "weights", "of fp32", "decode tok/s")

    md = ["# r1kit quickstart report", "", summary, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(row) + " |" for row in table]
    md += ["", "| stage | time |", "|---|---|"] + [f"| {a} | {b} |" for a, b in stages] + [""]
    md += [f"## {title}\n\n![{title}]({name})\n" for title, name in images]
    md += ["## Completions of held-out code (greedy)", ""]
    for sample in gen["samples"]:
        md += ["```python", sample["prompt"], "```"] + [f"**{k}**\n```python\n{sample['prompt']}{v}\n```" for k, v in sample.items() if k != "prompt"]
    (out / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")

    esc = html.escape
    rows = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in table)
    stage_rows = "".join(f"<tr><td>{esc(a)}</td><td>{esc(b)}</td></tr>" for a, b in stages)
    figures = "".join(f'<figure><img src="{name}" alt="{esc(title)}"><figcaption>{esc(title)}</figcaption></figure>' for title, name in images)
    samples = "".join(
        "<tr>" + "".join(f"<td><pre>{esc(sample['prompt'] + (sample[k] if k != 'prompt' else ''))}</pre></td>" for k in ("prompt", "fp32", "gptq", "rtn")) + "</tr>"
        for sample in gen["samples"]
    )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>r1kit quickstart report</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 8px;vertical-align:top}}
figure{{display:inline-block;margin:0.5em}}img{{max-width:520px}}pre{{margin:0;white-space:pre-wrap;font-size:12px}}</style>
</head><body><h1>r1kit quickstart report</h1><p>{esc(summary)}</p>
<table><tr>{"".join(f"<th>{esc(h)}</th>" for h in header)}</tr>{rows}</table>
<table><tr><th>stage</th><th>time</th></tr>{stage_rows}</table>
{figures}
<h2>Completions of held-out code (greedy)</h2>
<table><tr><th>prompt</th><th>fp32</th><th>GPTQ int4</th><th>RTN int4</th></tr>{samples}</table>
</body></html>
"""
    (out / "report.html").write_text(page, encoding="utf-8")
    return ["report.md", "report.html"] + [name for _, name in images]
