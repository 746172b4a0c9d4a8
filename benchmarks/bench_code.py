"""The code assistant's benchmark: completion exact match and edit similarity per language on code from
this machine (:mod:`r1kit.apps.code.bench_data`), and test generation on small standard-library modules
(share of modules with at least one passing test, mean line coverage, time per module).

    python benchmarks/bench_code.py [--model smollm2-135m-instruct] [--per-language 20] [--modules 10]

Writes a JSON report beside its printout (``--out``). Timings depend on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from tqdm import tqdm

from r1kit.apps.code.bench_data import (
    build,
    edit_similarity,
    exact_match,
    stdlib_modules,
)
from r1kit.apps.code.complete import CompletionConfig, complete
from r1kit.apps.code.languages import BY_NAME
from r1kit.apps.code.testgen import TestgenConfig, generate_tests, read_module
from r1kit.checkpoints import resolve_model
from r1kit.infer.llm import LLM


def bench_completion(llm, per_language: int, context: int, seed: int) -> dict:
    samples = build(per_language=per_language, seed=seed)
    scores: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for sample in tqdm(samples, desc="completion samples"):
        config = CompletionConfig(n=1, temperature=0.0, max_new_tokens=48 if sample.kind == "block" else 24,
                                  single_line=sample.kind == "line", context_tokens=context, neighbour_files=0)
        _, candidates = complete(llm, sample.prefix, sample.suffix, BY_NAME[sample.language], path=Path(sample.path).name, config=config)
        prediction = candidates[0].text if candidates else ""
        if sample.kind == "line":
            prediction = prediction.strip()
        for key in (sample.language, f"{sample.language}/{sample.kind}"):
            scores[key]["em"].append(exact_match(prediction, sample.target))
            scores[key]["es"].append(edit_similarity(prediction.strip(), sample.target.strip()))
    return {key: {"samples": len(v["em"]), "exact_match": statistics.mean(v["em"]), "edit_similarity": statistics.mean(v["es"])}
            for key, v in sorted(scores.items())}


def bench_testgen(llm, modules: int, max_new_tokens: int) -> dict:
    rows = []
    for path in tqdm(stdlib_modules()[:modules], desc="testgen modules"):
        start = time.perf_counter()
        result = generate_tests(llm, read_module(path), TestgenConfig(n=3, max_new_tokens=max_new_tokens))
        rows.append({"module": path.name, "tests_kept": len(result.tests), "coverage": result.coverage,
                     "seconds": time.perf_counter() - start,
                     "candidates": [r.problem or f"{len(r.kept)} kept, {len(r.dropped)} dropped" for r in result.candidates]})
    with_tests = [r for r in rows if r["tests_kept"]]
    return {"modules": rows, "share_with_a_passing_test": len(with_tests) / max(len(rows), 1),
            "mean_coverage_all_modules": statistics.mean([r["coverage"] or 0.0 for r in rows]) if rows else 0.0,
            "mean_seconds_per_module": statistics.mean([r["seconds"] for r in rows]) if rows else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--per-language", type=int, default=20, help="samples per language (half lines, half blocks)")
    parser.add_argument("--modules", type=int, default=10, help="standard-library modules for testgen")
    parser.add_argument("--testgen-tokens", type=int, default=256, help="max new tokens per candidate test file")
    parser.add_argument("--context", type=int, default=2048, help="completion context window (the assistant's default is 8192)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench_code.json")
    args = parser.parse_args()
    llm = LLM(resolve_model(args.model))
    report = {"model": args.model, "context": args.context, "threads": os.cpu_count()}
    report["completion"] = bench_completion(llm, args.per_language, args.context, args.seed)
    print(f"{'language':<22}{'n':>4}{'exact match':>13}{'edit sim':>10}")
    for key, row in report["completion"].items():
        print(f"{key:<22}{row['samples']:>4}{row['exact_match']:>13.3f}{row['edit_similarity']:>10.3f}")
    if args.modules:
        report["testgen"] = bench_testgen(llm, args.modules, args.testgen_tokens)
        tg = report["testgen"]
        for row in tg["modules"]:
            print(f"testgen {row['module']:<14} kept {row['tests_kept']:>2}  coverage {row['coverage'] or 0:5.1f}%  {row['seconds']:6.1f}s")
        print(f"testgen: {tg['share_with_a_passing_test']:.0%} of modules with a passing test, mean coverage "
              f"{tg['mean_coverage_all_modules']:.1f}%, {tg['mean_seconds_per_module']:.1f}s per module")
    fd, tmp = tempfile.mkstemp(dir=Path(args.out).resolve().parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(report, f, indent=2)
    os.replace(tmp, args.out)
    print(f"report: {args.out}")


if __name__ == "__main__":
    main()
