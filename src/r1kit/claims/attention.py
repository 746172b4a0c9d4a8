"""Claim §1.1: dynamic hybrid attention has 23% lower perplexity than global attention and is 1.8x
faster at 16K tokens.

Four models identical but for attention: ``global``; the guide's ``hybrid`` in every layer (gate
network mixing a sliding-window and a full global branch); ``local+hybrid`` (local layers with a
hybrid layer in every pair); ``hybrid compressed`` (the global branch attends to block summaries).
The FFN width of each is set so that all four have (nearly) the same parameter count; all train
the same steps on the stdlib corpus packed into long blocks, one run per seed. Each is measured on
held-out long sequences (perplexity overall and by position bucket, next-token accuracy), and the
first seed's models are timed at prefill and decode at 1K-16K tokens (the lengths the scale
allows), variants interleaved round-robin so drift hits all of them alike.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from r1kit.claims import training
from r1kit.claims.results import CANNOT_MEASURE, DOES_NOT_HOLD, HOLDS, Claim, Verdict, ratio_text
from r1kit.claims.scale import Scale
from r1kit.config import ModelConfig

NAME = "attention"
BASELINE = "global"
GUIDE = "hybrid"
VARIANTS: dict[str, dict[str, Any]] = {
    "global": {"attention": "global"},
    "hybrid": {"attention": "hybrid"},
    "local+hybrid": {"attention": ["local", "hybrid"]},
    "hybrid compressed": {"attention": "hybrid", "hybrid_global": "compressed"},
}
CLAIMS = (
    Claim("dha_perplexity", "1.1", "Dynamic hybrid attention: perplexity lower than pure global attention on 16K-token documents", "23% lower"),
    Claim("dha_speed", "1.1", "Dynamic hybrid attention: inference faster than pure global attention at 16K tokens", "1.8x faster"),
)
DECODE_STEPS = 8


def base_config(scale: Scale, vocab_size: int) -> ModelConfig:
    """The shared architecture: the guide's dynamic window (grows with the input up to 4096 tokens)."""
    return ModelConfig(
        vocab_size=vocab_size, hidden_size=scale.hidden_size, num_layers=scale.num_layers, num_heads=scale.num_heads,
        num_kv_heads=scale.num_kv_heads, intermediate_size=scale.intermediate_size, tie_embeddings=True,
        max_seq_len=max(scale.seq_len, *scale.speed_lengths), local_window=max(16, scale.seq_len // 16), max_local_window=4096,
        window_growth="proportional",
    )  # fmt: skip


def matched_configs(base: ModelConfig) -> dict[str, ModelConfig]:
    """Every variant, its FFN widened so its parameter count is closest to the largest variant's."""
    raw = {name: dataclasses.replace(base, **fields) for name, fields in VARIANTS.items()}
    target = max(c.num_parameters() for c in raw.values())

    def closest(config: ModelConfig) -> ModelConfig:
        widths = range(config.intermediate_size, config.intermediate_size + 64)
        return min((dataclasses.replace(config, intermediate_size=f) for f in widths), key=lambda c: abs(c.num_parameters() - target))

    return {name: closest(config) for name, config in raw.items()}


@torch.inference_mode()
def speed(models: dict[str, Any], lengths: tuple[int, ...], repeats: int) -> dict[str, dict[str, dict[str, float]]]:
    """Median prefill ms (batch 1) and decode ms/token after that prefill, per length and variant."""
    from r1kit.model.cache import ContiguousKVCache

    out: dict[str, dict[str, dict[str, float]]] = {}
    for n in lengths:
        tokens = torch.randint(0, next(iter(models.values())).config.vocab_size, (1, n + DECODE_STEPS))
        times: dict[str, dict[str, list[float]]] = {name: {"prefill": [], "decode": []} for name in models}
        for round_ in range(repeats + 1):  # round 0 warms up
            for name, model in models.items():
                cache = ContiguousKVCache(model.config, window=model.config.window_for(n))
                start = time.perf_counter()
                model(tokens[:, :n], cache=cache, select=[-1])
                mid = time.perf_counter()
                for i in range(n, n + DECODE_STEPS):
                    model(tokens[:, i : i + 1], cache=cache)
                end = time.perf_counter()
                if round_:
                    times[name]["prefill"].append(1e3 * (mid - start))
                    times[name]["decode"].append(1e3 * (end - mid) / DECODE_STEPS)
        out[str(n)] = {name: {k: statistics.median(v) for k, v in t.items()} for name, t in times.items()}
    return out


def run(out: Path, scale: Scale, shards: Path, device: torch.device, log: Callable[[str], None]) -> dict[str, Any]:
    """Train, measure and time every variant; returns the experiment's result."""
    from r1kit.checkpoints import load_model
    from r1kit.data.shards import ShardDataset

    work = Path(out) / "work" / NAME
    configs = matched_configs(base_config(scale, ShardDataset(shards, "train", scale.seq_len).vocab_size))
    runs = len(configs) * scale.seeds
    steps = training.plan_steps(list(configs.values()), scale, scale.train_seconds(NAME, runs), device, work / "plan.json")
    log(f"attention: {len(configs)} variants × {scale.seeds} seed(s), {steps} steps each at {scale.seq_len} tokens")
    buckets = 8 if scale.seq_len >= 1024 else 4
    per_variant: dict[str, Any] = {}
    model_dirs: dict[str, Path] = {}
    for name, config in configs.items():
        seeds = []
        for seed in range(scale.seeds):
            run_dir = work / f"{name.replace(' ', '-').replace('+', '-')}-seed{seed}"
            summary = training.train(run_dir, config, shards, scale, steps, seed, log=log)
            blocks = training.held_out_blocks(shards, Path(summary["model"]), scale.seq_len, scale.eval_blocks)
            seeds.append({"seed": seed, "steps": summary["steps"], "tokens": summary["tokens"], "train_seconds": summary["elapsed_s"],
                          "unigram_ppl": summary["unigram_ppl"],
                          **training.measure(run_dir, Path(summary["model"]), blocks, buckets)})  # fmt: skip
            model_dirs.setdefault(name, Path(summary["model"]))
        per_variant[name] = {
            "parameters": config.num_parameters(), "intermediate_size": config.intermediate_size, "attention": list(config.attention),
            "hybrid_global": config.hybrid_global, "runs": seeds,
            "ppl": training.spread([s["ppl"] for s in seeds]), "accuracy": training.spread([s["accuracy"] for s in seeds]),
        }  # fmt: skip
    log(f"attention: timing prefill and decode at {', '.join(map(str, scale.speed_lengths))} tokens")
    models = {name: load_model(d, dtype=torch.float32, device=device).eval() for name, d in model_dirs.items()}
    timings = speed(models, scale.speed_lengths, repeats=1 if scale.tier == "tiny" else 3)
    return {"steps": steps, "seq_len": scale.seq_len, "seeds": scale.seeds, "eval_blocks": scale.eval_blocks,
            "device": str(device), "variants": per_variant, "speed": timings}  # fmt: skip


def change(lower: float) -> str:
    """A relative perplexity change in words: "12.0% lower" or "3.0% higher"."""
    return f"{ratio_text(lower)} lower" if lower >= 0 else f"{ratio_text(-lower)} higher"


def verdicts(result: dict[str, Any]) -> dict[str, Verdict]:
    """The two §1.1 claims, read from the experiment's result."""
    variants = result["variants"]
    base, guide = variants[BASELINE]["ppl"], variants[GUIDE]["ppl"]
    lower = 1 - guide["mean"] / base["mean"]
    noise = base["std"] + guide["std"]
    scale_text = (f"{variants[GUIDE]['parameters']:,}-parameter models, {result['steps']} steps × {result['seq_len']} tokens, "
                  f"{result['seeds']} seed(s), {result['eval_blocks']} held-out blocks of {result['seq_len']} tokens")  # fmt: skip
    others = ", ".join(f"{name} {change(1 - v['ppl']['mean'] / base['mean'])}" for name, v in variants.items() if name not in (BASELINE, GUIDE))
    told = result["seeds"] > 1 and abs(guide["mean"] - base["mean"]) > noise
    weakest = max(v["ppl"]["mean"] for v in variants.values())
    untrained = training.undertrained(weakest, variants[BASELINE]["runs"][0]["unigram_ppl"])
    ppl_verdict = Verdict(
        measured=f"{change(lower)} (ppl {guide['mean']:.2f} ± {guide['std']:.2f} vs {base['mean']:.2f} ± {base['std']:.2f}); others: {others}",
        method=f"same parameter count and tokens; perplexity on held-out packed stdlib sequences; {scale_text}",
        verdict=CANNOT_MEASURE if untrained else HOLDS if lower >= 0.23 and (told or result["seeds"] == 1) else DOES_NOT_HOLD,
        why=untrained or (f"measured at {result['seq_len']} tokens, not 16K; "
             + ("the difference exceeds the seeds' spread" if told else "one seed: the spread is unknown" if result["seeds"] == 1
                else "the difference is within the seeds' spread")),
    )  # fmt: skip
    longest = max(result["speed"], key=int)
    at = result["speed"][longest]
    prefill = {name: at[BASELINE]["prefill"] / t["prefill"] for name, t in at.items()}
    decode = {name: at[BASELINE]["decode"] / t["decode"] for name, t in at.items()}
    speed_verdict = Verdict(
        measured=(f"prefill {prefill[GUIDE]:.2f}x, decode {decode[GUIDE]:.2f}x of global at {int(longest):,} tokens; "
                  + ", ".join(f"{name} {prefill[name]:.2f}x/{decode[name]:.2f}x" for name in at if name not in (BASELINE, GUIDE))),
        method=f"median wall time of one prefill (batch 1) and of {DECODE_STEPS} cached decode steps, variants interleaved, on {result['device']}",
        verdict=HOLDS if int(longest) >= 16384 and prefill[GUIDE] >= 1.8 else DOES_NOT_HOLD,
        why=("the guide's hybrid computes a full global branch as well as the local one, so it cannot be faster than global alone"
             if prefill[GUIDE] < 1.0 else "speed ratio measured")
            + ("" if int(longest) >= 16384 else f"; lengths above {int(longest):,} did not fit this budget")
            + "; timings on a shared machine are noisy, ratios are from the same run",
    )  # fmt: skip
    return {"dha_perplexity": ppl_verdict, "dha_speed": speed_verdict}
