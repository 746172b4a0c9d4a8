"""`r1kit quickstart`: the whole reproduction on the embedded corpus, one resumable command.

prepare -> train (tiny-cpu, bounded time) -> quantize (GPTQ and RTN, 4-bit g128) -> perplexity of all
three -> side-by-side completions of held-out code -> a report (report.md + report.html with PNG plots).
Each stage runs the same code as its own verb; a stage that finished is recorded in ``state.json`` and
skipped on a re-run, so an interrupted quickstart resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import sysconfig
import time
from pathlib import Path
from typing import Any, Callable

from r1kit.config import dump_json

STAGES = ("prepare", "train", "quantize", "evaluate", "generate", "report")
SLICE = ("json", "email", "http", "xml", "pydoc_data")  # --small: a corner of the standard library, for CI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/quickstart", help="folder for every stage's outputs and the report (default runs/quickstart)")
    parser.add_argument("--minutes", type=float, default=8.0, help="training time budget in minutes (default 8)")
    parser.add_argument("--config", default=None, help="run config for training (default: configs/tiny-cpu.yaml of this checkout)")
    parser.add_argument("--small", action="store_true", help="a small slice of the corpus, a small model and 120 training steps (the CI run)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every stage (default 0)")
    parser.add_argument("--until", choices=STAGES, default=None, help="stop after this stage; a later run without it goes on from there")
    parser.add_argument("--serve", action="store_true", help="finally serve the quantized model and print curl/openai examples")
    parser.add_argument("--port", type=int, default=8080, help="port for --serve (default 8080)")


def _cli(*argv: str) -> None:
    from r1kit.cli import main

    code = main([str(a) for a in argv])
    if code:
        raise SystemExit(f"r1kit quickstart: `r1kit {argv[0]}` failed (exit {code})")


def _config_path(args: argparse.Namespace) -> Path:
    if args.config:
        return Path(args.config)
    return Path(__file__).resolve().parents[3] / "configs" / "tiny-cpu.yaml"


# -- stages ------------------------------------------------------------------------------------------
def stage_prepare(args, out: Path) -> dict[str, Any]:
    extra: list[str] = []
    if args.small:
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        extra = ["--inputs", *[str(stdlib / name) for name in SLICE], "--min-tokens", "64", "--max-tokens", "4096", "--workers", "1", "--val-fraction", "0.15"]
    _cli("prepare", "--output", out / "data", "--vocab-size", 2048 if args.small else 8192, "--seed", args.seed, *extra)
    return json.loads((out / "data" / "report.json").read_text())["shards"]


def stage_train(args, out: Path) -> dict[str, Any]:
    vocab = json.loads((out / "data" / "shards" / "index.json").read_text())["vocab_size"]
    config = _config_path(args)
    if args.small:  # a smaller model for the CI run, written beside the outputs
        from r1kit.config import load_yaml

        raw = load_yaml(config)
        raw["model"].update(vocab_size=vocab, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)
        config = out / "train-small.yaml"
        config.write_text(json.dumps(raw))
    _cli("train", "--config", config, "--data", out / "data" / "shards", "--out", out / "train", "--max-minutes", args.minutes,
         "--seed", args.seed, "--resume",
         *(["--max-steps", "120", "--eval-every", "20", "--save-every", "20", "--log-every", "5"] if args.small else []))  # fmt: skip
    return json.loads((out / "train" / "summary.json").read_text())


def group_size_for(model_dir: Path) -> int:
    """The seed's group of 128, or the largest of 64/32 that divides a toy model's widths."""
    from r1kit.model.hf import load_config

    cfg = load_config(model_dir)
    return next(g for g in (128, 64, 32) if cfg.hidden_size % g == 0 and cfg.intermediate_size % g == 0)


def stage_quantize(args, out: Path) -> dict[str, Any]:
    sizes = {}
    group = group_size_for(out / "train" / "model")
    for method in ("gptq", "rtn"):
        extra = ["--calib", out / "data" / "shards", "--nsamples", 32 if args.small else 128, "--seqlen", 128] if method == "gptq" else []
        _cli("quantize", "--model", out / "train" / "model", "--out", out / method, "--method", method, "--group-size", group,
             "--force", "--no-progress", *extra)  # fmt: skip
    for name in ("fp32", "gptq", "rtn"):
        folder = out / "train" / "model" if name == "fp32" else out / name
        sizes[name] = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    return {"bytes": sizes, "group_size": group}


def _models(out: Path) -> dict[str, Path]:
    return {"fp32": out / "train" / "model", "gptq": out / "gptq", "rtn": out / "rtn"}


def stage_evaluate(args, out: Path) -> dict[str, Any]:
    import torch

    from r1kit.checkpoints import load_model
    from r1kit.evaluate import blocks_from, perplexity

    # the blocks the trainer validated on (8 batches of 16 at 128 tokens in tiny-cpu): the fp32 row matches its figure
    blocks = blocks_from(str(out / "data" / "shards"), str(out / "train" / "model"), 128, 16 if args.small else 128)
    result = {}
    for name, folder in _models(out).items():
        result[name] = perplexity(load_model(folder, dtype=torch.float32), blocks, buckets=4, batch_size=4)
    return result


def held_out_prompts(out: Path, count: int, tokens: int = 24) -> list[list[int]]:
    """The openings of validation documents: text the model never trained on."""
    from r1kit.data.shards import ShardDataset

    val = ShardDataset(out / "data" / "shards", "val", 8, shuffle=False)
    entry = val.index["splits"]["val"]
    prompts = []
    for offset, length in zip(entry["offsets"], entry["counts"]):
        if length > tokens + 1:
            prompts.append([int(t) for t in val.read(offset + 1, offset + 1 + tokens)])  # skip <|bos|>
        if len(prompts) == count:
            break
    return prompts


def stage_generate(args, out: Path) -> dict[str, Any]:
    import torch

    from r1kit.tokenizer import load_tokenizer
    from r1kit.infer.generate import generate
    from r1kit.infer.sampling import SamplingParams
    from r1kit.checkpoints import load_model

    tok = load_tokenizer(out / "train" / "model")
    prompts = held_out_prompts(out, 2 if args.small else 4)
    params = SamplingParams(temperature=0, max_tokens=16 if args.small else 48, repetition_penalty=1.2)
    rows, speed = [], {}
    for name, folder in _models(out).items():
        model = load_model(folder, dtype=torch.float32)
        start, produced = time.perf_counter(), 0
        for i, prompt in enumerate(prompts):
            ids = generate(model, prompt, params)
            produced += len(ids)
            if name == "fp32":
                rows.append({"prompt": tok.decode(prompt)})
            rows[i][name] = tok.decode(ids)
        speed[name] = produced / (time.perf_counter() - start)
    return {"samples": rows, "tokens_per_s": speed}


def stage_report(args, out: Path) -> dict[str, Any]:
    from r1kit.report import write_report

    return {"files": write_report(out)}


RUNNERS: dict[str, Callable[[argparse.Namespace, Path], dict[str, Any]]] = {
    "prepare": stage_prepare, "train": stage_train, "quantize": stage_quantize,
    "evaluate": stage_evaluate, "generate": stage_generate, "report": stage_report,
}  # fmt: skip


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state_file = out / "state.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {"done": {}}
    for i, stage in enumerate(STAGES, 1):
        if stage in state["done"]:
            print(f"[{i}/{len(STAGES)}] {stage}: done earlier, skipped", flush=True)
            continue
        print(f"[{i}/{len(STAGES)}] {stage} ...", flush=True)
        start = time.perf_counter()
        result = RUNNERS[stage](args, out)
        state["done"][stage] = {"seconds": round(time.perf_counter() - start, 1), "result": result}
        dump_json(state, state_file)  # atomic: a stage counts as done only once this is written
        if stage == args.until:
            print(f"stopped after {stage} (--until); run again without --until to go on", flush=True)
            return 0
    ev, train = state["done"]["evaluate"]["result"], state["done"]["train"]["result"]
    print(f"\nvalidation perplexity {train['val_ppl']:.2f} (unigram baseline {train['unigram_ppl']:.1f}); "
          + ", ".join(f"{k} {v['ppl']:.2f}" for k, v in ev.items()) + f"\nreport: {out / 'report.html'}")  # fmt: skip
    if args.serve:
        print(f"\nserving {out / 'gptq'} on port {args.port}; try:\n"
              f"  curl -s localhost:{args.port}/v1/completions -H 'content-type: application/json' "
              f"-d '{{\"model\": \"gptq\", \"prompt\": \"def main(\", \"max_tokens\": 32}}'\n"
              f"  python -c \"from openai import OpenAI; c = OpenAI(base_url='http://localhost:{args.port}/v1', api_key='x'); "
              f"print(c.completions.create(model='gptq', prompt='import os', max_tokens=32).choices[0].text)\"", flush=True)  # fmt: skip
        _cli("serve", "--model", out / "gptq", "--port", args.port)
    return 0 if math.isfinite(train["val_ppl"]) else 1
