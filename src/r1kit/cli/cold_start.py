"""`r1kit cold-start`: worked solutions of a task's training problems in R1's format, as chats for `r1kit sft`.

It reads the ``task:`` section of a GRPO run config (the same file `r1kit grpo` takes), so the chats
pose the problems exactly as the RL run will; ``--task`` overrides ``task.name``. Every trace is checked
by the task's verifier before it is written (see :mod:`r1kit.reason.cold_start`).
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="GRPO run config YAML; its task: section sets the problems (e.g. configs/grpo-think-cpu.yaml)")
    parser.add_argument("--task", default=None, help="arithmetic or countdown (overrides task.name)")
    parser.add_argument("--count", type=int, default=1000, help="how many chats to write (default 1000)")
    parser.add_argument("--out", required=True, help="the JSONL file to write, one {\"messages\": [...]} per line")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from r1kit.reason.cold_start import write_chats
    from r1kit.reason.config import GRPO_SECTIONS, load_sections

    task = load_sections(args.config, GRPO_SECTIONS, {"task": {"name": args.task}})["task"]
    bar = lambda chats: tqdm(chats, total=args.count, desc="cold-start", unit="chat", disable=None)
    path = write_chats(task, args.count, args.out, progress=bar)
    print(f"wrote {args.count} chats ({task.name}) to {path}")
    return 0
