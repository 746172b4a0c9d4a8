"""`r1kit apps testgen MODULE.py --out tests/test_MODULE.py -n 3`: generate pytest tests for a module and
keep only those that pass in r1kit's sandbox.

Writes one test file (atomically) whose header states the line coverage the kept tests reach and what
was dropped and why, and prints the same summary.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from r1kit.device import DTYPE_CHOICES

DEFAULT_MODEL = "smollm2-135m-instruct"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("module", help="the Python module to test (MODULE.py, UTF-8)")
    parser.add_argument("--out", required=True, help="where to write the test file, e.g. tests/test_MODULE.py")
    parser.add_argument("-n", type=int, default=3, help="candidate test files to generate (default 3, the seed's)")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"model directory, .gguf file or pulled model name (default {DEFAULT_MODEL}: run `r1kit pull {DEFAULT_MODEL}` once)")
    parser.add_argument("--max-new-tokens", type=int, default=384, help="most tokens per candidate file (default 384)")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds each sandboxed pytest run may take (default 30)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="weights dtype (default: the checkpoint's)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from r1kit.apps.code.testgen import (
        TestgenConfig,
        generate_tests,
        read_module,
        render,
    )
    from r1kit.checkpoints.load import resolve_model
    from r1kit.config import write_text_atomic

    module = read_module(args.module)  # bad input fails before the model loads
    config = TestgenConfig(n=args.n, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           timeout_s=args.timeout, seed=args.seed)
    from r1kit.infer.llm import LLM

    llm = LLM(resolve_model(args.model), dtype=args.dtype, device=args.device)
    with tqdm(total=config.n, desc="candidates run in the sandbox") as progress:
        result = generate_tests(llm, module, config, progress)
    out = Path(args.out)
    write_text_atomic(out, render(result, module, out, str(args.model)))
    coverage = "-" if result.coverage is None else f"{result.coverage:.1f}%"
    print(f"wrote {out}: {len(result.tests)} passing test(s) kept, line coverage of {module.path.name}: {coverage}")
    for report in result.candidates:
        status = report.problem or f"{len(report.kept)} kept, {len(report.dropped)} dropped"
        print(f"  candidate {report.index}: {status}")
        for name, reason in report.dropped:
            print(f"    dropped {name}: {reason}")
    return 0
