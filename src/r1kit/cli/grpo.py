"""`r1kit grpo`: reinforcement learning with verifiable rewards (GRPO) on a task, from a run config.

The YAML has ``task:``, ``grpo:`` and ``optim:`` sections (see configs/grpo-cpu.yaml); ``--task``
and the flags below override them. Started under ``torchrun --nproc-per-node N`` it samples and
trains data-parallel. The run leaves metrics.jsonl, TensorBoard logs, checkpoints, ``model/`` and
report.html (reward, accuracy and length curves) under ``--out``.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model directory, .gguf file or pulled model name (e.g. smollm2-135m-instruct)")
    parser.add_argument("--task", default=None, help="arithmetic, countdown, package.module:function or problems.jsonl (overrides task.name)")
    parser.add_argument("--config", default=None, help="run config YAML with task:, grpo: and optim: sections, e.g. configs/grpo-cpu.yaml")
    parser.add_argument("--out", required=True, help="run folder: metrics, checkpoints, the final model and report.html")
    parser.add_argument("--resume", action="store_true", help="continue from the newest intact checkpoint under --out")
    parser.add_argument("--max-steps", type=int, default=None, help="override grpo.max_steps")
    parser.add_argument("--max-minutes", type=float, default=None, help="override grpo.max_minutes")
    parser.add_argument("--device", default=None, help="override grpo.device (auto, cpu, cuda)")


def run(args: argparse.Namespace) -> int:
    from r1kit.reason.config import GRPO_SECTIONS, load_sections
    from r1kit.reason.grpo import GRPOTrainer

    overrides = {"task": {"name": args.task}, "grpo": {"max_steps": args.max_steps, "max_minutes": args.max_minutes, "device": args.device}}
    sections = load_sections(args.config, GRPO_SECTIONS, overrides)
    summary = GRPOTrainer(args.model, sections["task"], sections["grpo"], sections["optim"], args.out, resume=args.resume).train()
    print(f"report: {summary['report']}" if "report" in summary else "")
    return 0
