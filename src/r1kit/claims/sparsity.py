"""Claim §1.2: Top-K sparse activation gives 40% fewer parameters at 98% of the accuracy.

Dense and Top-K models (fixed sparsity at the controller's lower bound, target and upper bound:
0.3, 0.6, 0.8, and one whose sparsity the adaptive controller moves from 0.3 toward 0.6) train the same steps on the same data; each is measured by held-out perplexity and
next-token accuracy, as a ratio to the dense model's. Top-K alone keeps every weight, so the Top-K
model at the target sparsity is then pruned (:mod:`r1kit.claims.pruning`) to 40% fewer
non-embedding parameters, once by how often its neurons were selected and once by weight
magnitude, and each pruned model gets the same short recovery fine-tune before it is measured.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from r1kit.claims import pruning, training
from r1kit.claims.results import CANNOT_MEASURE, DOES_NOT_HOLD, HOLDS, Claim, Verdict, ratio_text
from r1kit.claims.scale import Scale
from r1kit.config import ModelConfig
from r1kit.model.sparsity import SparsityControl

NAME = "sparsity"
FEWER = 0.4  # the guide's "40% fewer parameters"
RECOVERY = 0.2  # recovery fine-tune, as a share of the main runs' steps
CONTROLLED = "topk controller"  # Top-K whose sparsity the adaptive controller sets during training
CLAIMS = (Claim("topk_parameters", "1.2", "Dynamic sparse activation (Top-K): fewer parameters with the original accuracy kept (FP16)",
                "40% fewer parameters, 98% of accuracy"),)  # fmt: skip


def sparsities() -> tuple[float, ...]:
    """The controller's lower bound, target and upper bound."""
    control = SparsityControl()
    return (control.lower, control.target, control.upper)


def configs(scale: Scale, vocab_size: int) -> dict[str, ModelConfig]:
    base = ModelConfig(
        vocab_size=vocab_size, hidden_size=scale.hidden_size, num_layers=scale.num_layers, num_heads=scale.num_heads,
        num_kv_heads=scale.num_kv_heads, intermediate_size=scale.intermediate_size, tie_embeddings=True, max_seq_len=scale.seq_len,
    )  # fmt: skip
    out = {"dense": base}
    out.update({f"topk {s:.1f}": dataclasses.replace(base, ffn="topk", topk_sparsity=s) for s in sparsities()})
    out[CONTROLLED] = dataclasses.replace(base, ffn="topk", topk_sparsity=SparsityControl().lower)  # the controller moves it from there
    return out


def reached_sparsity(model_dir: Path) -> float:
    """The mean Top-K sparsity over the layers of a trained model (0 for a dense one), as its config records it."""
    from r1kit.model.hf import load_config

    config = load_config(model_dir)
    values = [config.sparsity_for(i) if kind == "topk" else 0.0 for i, kind in enumerate(config.ffn)]
    return sum(values) / len(values)


def train_blocks(shards: Path, seq_len: int, count: int) -> np.ndarray:
    """The first ``count`` training blocks (what the selection statistics are counted on)."""
    from r1kit.data.shards import ShardDataset

    data = ShardDataset(shards, "train", seq_len, shuffle=False)
    return np.stack([data.read(i * seq_len, (i + 1) * seq_len + 1) for i in range(min(count, len(data)))])


def run(out: Path, scale: Scale, shards: Path, device: torch.device, log: Callable[[str], None]) -> dict[str, Any]:
    """Train, prune, fine-tune and measure; returns the experiment's result."""
    from r1kit.checkpoints import load_model
    from r1kit.data.shards import ShardDataset

    work = Path(out) / "work" / NAME
    models = configs(scale, ShardDataset(shards, "train", scale.seq_len).vocab_size)
    steps = training.plan_steps(list(models.values()), scale, scale.train_seconds(NAME, len(models) + 2 * RECOVERY), device, work / "plan.json")
    recovery = max(2, int(RECOVERY * steps))
    log(f"sparsity: {len(models)} models, {steps} steps each at {scale.seq_len} tokens; pruning + {recovery} recovery steps")
    rows: dict[str, Any] = {}
    blocks = None
    for name, config in models.items():
        run_dir = work / name.replace(" ", "-")
        control = SparsityControl() if name == CONTROLLED else None
        summary = training.train(run_dir, config, shards, scale, steps, seed=0, control=control, log=log)
        blocks = training.held_out_blocks(shards, Path(summary["model"]), scale.seq_len, scale.eval_blocks) if blocks is None else blocks
        kind = "dense" if name == "dense" else "controller" if name == CONTROLLED else "fixed"
        rows[name] = {"kind": kind, "parameters": config.num_parameters(), "sparsity": reached_sparsity(Path(summary["model"])),
                      "steps": summary["steps"], "unigram_ppl": summary["unigram_ppl"],
                      **training.measure(run_dir, Path(summary["model"]), blocks, buckets=4)}  # fmt: skip
    source_name = f"topk {SparsityControl().target:.1f}"
    source = load_model(work / source_name.replace(" ", "-") / "model", dtype=torch.float32)
    width = pruning.width_for(source.config, FEWER)
    scores = {"selection": pruning.selection_counts(source, train_blocks(shards, scale.seq_len, scale.eval_blocks)),
              "magnitude": pruning.magnitude_scores(source)}  # fmt: skip
    for how, layer_scores in scores.items():
        name = f"pruned by {how}"
        run_dir = work / name.replace(" ", "-")
        pruned_dir = run_dir / "pruned"
        if not (pruned_dir / "config.json").is_file():
            pruning.prune(source, layer_scores, width).save_pretrained(pruned_dir)
        summary = training.train(run_dir / "recovery", None, shards, scale, recovery, seed=0, init_from=pruned_dir, lr=training.LR / 3, log=log)
        config = load_model(pruned_dir).config
        rows[name] = {"kind": "pruned", "parameters": config.num_parameters(), "non_embedding_parameters": pruning.non_embedding_parameters(config),
                      "intermediate_size": width, "steps": summary["steps"],
                      **training.measure(run_dir, Path(summary["model"]), blocks, buckets=4)}  # fmt: skip
    dense = rows["dense"]
    for row in rows.values():
        row["accuracy_ratio"] = row["accuracy"] / dense["accuracy"] if dense["accuracy"] else None
        row["ppl_ratio"] = row["ppl"] / dense["ppl"]
    return {"steps": steps, "recovery_steps": recovery, "seq_len": scale.seq_len, "source": source_name, "fewer": FEWER,
            "dense_non_embedding_parameters": pruning.non_embedding_parameters(models["dense"]), "models": rows}  # fmt: skip


def verdicts(result: dict[str, Any]) -> dict[str, Verdict]:
    models = result["models"]
    dense, pruned, magnitude = models["dense"], models["pruned by selection"], models["pruned by magnitude"]
    fewer_blocks = 1 - pruned["non_embedding_parameters"] / result["dense_non_embedding_parameters"]
    fewer_total = 1 - pruned["parameters"] / dense["parameters"]
    topk = "; ".join(f"{name} (sparsity {row['sparsity']:.2f}): accuracy {ratio_text(row['accuracy_ratio'])}, ppl {row['ppl']:.2f}" for name, row in models.items() if name.startswith("topk"))
    holds = fewer_blocks >= FEWER - 1e-9 and (pruned["accuracy_ratio"] or 0.0) >= 0.98
    untrained = training.undertrained(dense["ppl"], dense["unigram_ppl"])
    return {"topk_parameters": Verdict(
        measured=(f"pruned by selection: {ratio_text(fewer_blocks)} fewer non-embedding parameters ({ratio_text(fewer_total)} of all), "
                  f"accuracy {ratio_text(pruned['accuracy_ratio'])} of dense (ppl {pruned['ppl']:.2f} vs {dense['ppl']:.2f}); "
                  f"by magnitude: {ratio_text(magnitude['accuracy_ratio'])}; Top-K alone keeps every weight ({topk})"),
        method=(f"dense vs Top-K at the controller's sparsities, {result['steps']} steps × {result['seq_len']} tokens each; the Top-K "
                f"{result['source'].split()[-1]} model pruned to {ratio_text(result['fewer'], 0)} fewer non-embedding parameters "
                f"+ {result['recovery_steps']} recovery steps; next-token accuracy on held-out stdlib text"),
        verdict=CANNOT_MEASURE if untrained else HOLDS if holds else DOES_NOT_HOLD,
        why=untrained or ("pruning by selection statistics reached the parameter target and kept 98% of dense accuracy" if holds else
             "the pruned model kept less than 98% of the dense model's next-token accuracy"
             if fewer_blocks >= FEWER - 1e-9 else "the pruning did not reach the parameter target")
            + f"; embeddings ({dense['parameters'] - result['dense_non_embedding_parameters']:,} parameters) are not pruned",
    )}  # fmt: skip
