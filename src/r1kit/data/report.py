"""The prepare report: what each stage kept and dropped, why, how fast, and what the corpus looks like.

Writes ``report.json`` (machine-readable), ``dropped.jsonl`` (every dropped document with its source,
line/row, stage, reason and, for a duplicate, the document it duplicates) and ``lengths.png`` (the
token-length histogram). It reads only the stages' ``stats.json`` and drop files, so it is cheap and
always rebuilt; it must never change the stages' outputs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from r1kit.data.config import PrepareConfig
from r1kit.data.dedup import candidate_probability
from r1kit.data.records import AtomicWriter, write_json


def write_report(out: Path, cfg: PrepareConfig, fingerprint: str, stats: list[dict[str, Any]],
                 drop_files: list[Path]) -> dict[str, Any]:
    """Assemble and write the report from every stage's stats; returns it."""
    by_stage = {s["stage"]: s for s in stats}
    counts = []
    for s in stats:
        for name, sub in s.get("substages", {}).items():
            counts.append({"stage": name, "in": sub["in"], "kept": sub["kept"],
                           "dropped": sum(sub["dropped"].values()), "reasons": sub["dropped"]})
    throughput = []
    for s in stats:
        seconds = max(s["seconds"], 1e-9)
        throughput.append({"stage": s["stage"], "documents": s.get("in", 0), "MB": round(s.get("bytes", 0) / 1e6, 3),
                           "seconds": s["seconds"], "docs_per_s": round(s.get("in", 0) / seconds, 1),
                           "MB_per_s": round(s.get("bytes", 0) / 1e6 / seconds, 3)})
    dedup = by_stage["dedup"]["substages"]
    near_groups = _concat_drops(out / "dropped.jsonl", drop_files)
    report = {
        "fingerprint": fingerprint,
        "config": cfg.to_dict(),
        "stages": counts,
        "throughput": throughput,
        "duplicates": {
            "exact": sum(dedup["exact_dup"]["dropped"].values()),
            "near": sum(dedup["near_dup"]["dropped"].values()),
            "near_groups": len(near_groups),
            "bands": cfg.minhash_bands, "rows": cfg.minhash_rows,
            "candidate_probability_at_threshold": round(
                candidate_probability(cfg.near_dup_threshold, cfg.minhash_bands, cfg.minhash_rows), 6),
            "candidates_checked": by_stage["dedup"]["candidates_checked"],
        },
        "augmented": by_stage["augment"]["added"],
        "languages": by_stage["shards"]["languages"],
        "lengths": by_stage["length"]["lengths"],
        "tokenizer": {"vocab_size": by_stage["tokenizer"]["vocab_size"], "source": by_stage["tokenizer"]["source"]},
        "shards": {"dtype": by_stage["shards"]["dtype"], **by_stage["shards"]["splits"]},
        "outputs": {"shards": "shards/index.json", "tokenizer": "tokenizer.json", "dropped": "dropped.jsonl",
                    "histogram": "lengths.png"},
    }
    _plot(out / "lengths.png", report["lengths"], cfg)
    write_json(out / "report.json", report)
    return report


def _concat_drops(path: Path, drop_files: list[Path]) -> set[str]:
    """Join the stages' drop files in stage order; returns the ids that near-duplicates point to."""
    groups: set[str] = set()
    with AtomicWriter(path, "wb") as w:
        for file in drop_files:
            if file.is_file():
                with open(file, "rb") as f:
                    for line in f:
                        w.file.write(line)
                        if b'"near_duplicate"' in line:
                            groups.add(json.loads(line)["duplicate_of"])
    return groups


def _plot(path: Path, lengths: dict[str, Any], cfg: PrepareConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: never open a window
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if lengths.get("count"):
        edges, counts = lengths["histogram"]["edges"], lengths["histogram"]["counts"]
        ax.stairs(counts, edges, fill=True)
        ax.set_xscale("log")
    ax.set_xlabel("tokens per document (log scale)")
    ax.set_ylabel("documents")
    ax.set_title(f"kept documents: {lengths.get('count', 0)} (filter {cfg.min_tokens}-{cfg.max_tokens} tokens)")
    fig.tight_layout()
    with AtomicWriter(path, "wb") as w:
        fig.savefig(w.file, format="png")
    plt.close(fig)
