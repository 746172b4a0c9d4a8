"""`r1kit claims`: measure every figure the guide states and write claims.md / claims.html.

A thin shell over :mod:`r1kit.claims.runner`: it builds the run's config from the flags and runs it.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from r1kit.claims.registry import EXPERIMENTS

    parser.add_argument("--budget-minutes", type=float, default=60.0,
                        help="wall-clock budget; sizes are derived from it (default 60: fits a 2-core CPU; more, or a GPU, scales every experiment up)")
    parser.add_argument("--out", default="runs/claims", help="folder for the metric files, work files and the report (default runs/claims)")
    parser.add_argument("--only", nargs="+", choices=list(EXPERIMENTS), metavar="NAME",
                        help=f"run only these experiments ({', '.join(EXPERIMENTS)}); the report still shows every claim")
    parser.add_argument("--support-metrics", help="the support app benchmark's metrics.json (default runs/bench-support/metrics.json)")
    parser.add_argument("--gptq-model", default="smollm2-135m-instruct", help="model the GPTQ claim is measured on (pulled name or directory)")
    parser.add_argument("--device", default="auto", help="auto (a GPU where there is one), cpu or cuda[:N]")
    parser.add_argument("--report-only", action="store_true", help="rewrite claims.md/claims.html from the metric files without running anything")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from r1kit.claims.report import write_report
    from r1kit.claims.runner import ClaimsConfig, run_claims

    if args.report_only:
        files = write_report(Path(args.out))
        print(f"report: {Path(args.out) / files[0]} and {Path(args.out) / files[1]}")
        return 0
    config = ClaimsConfig(out=args.out, budget_minutes=args.budget_minutes, only=tuple(args.only or ()),
                          support_metrics=args.support_metrics, gptq_model=args.gptq_model, device=args.device)  # fmt: skip
    statuses = run_claims(config)
    return 1 if "failed" in statuses.values() else 0
