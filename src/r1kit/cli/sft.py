"""`r1kit sft`: supervised fine-tuning on chats (JSONL of ``messages`` or ``prompt``/``completion``).

The checkpoint's chat template renders each chat; only assistant tokens carry loss; chats are packed
into rows that keep them apart. ``--lora-rank R`` trains LoRA adapters (through ``peft``) and merges
them into every saved model. Started under ``torchrun --nproc-per-node N`` it trains data-parallel.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model directory, .gguf file or pulled model name")
    parser.add_argument("--data", required=True, help="JSONL of chats: {\"messages\": [...]} or {\"prompt\": ..., \"completion\": ...}")
    parser.add_argument("--config", default=None, help="YAML with sft: and optim: sections (every value has a default)")
    parser.add_argument("--out", required=True, help="run folder: metrics, checkpoints and the final model")
    parser.add_argument("--lora-rank", type=int, default=None, help="train LoRA adapters of this rank instead of every weight (overrides sft.lora_rank)")
    parser.add_argument("--max-steps", type=int, default=None, help="override sft.max_steps")
    parser.add_argument("--lr", type=float, default=None, help="override optim.lr")
    parser.add_argument("--device", default=None, help="override sft.device (auto, cpu, cuda)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest intact checkpoint under --out")


def run(args: argparse.Namespace) -> int:
    from r1kit.reason.config import SFT_SECTIONS, load_sections
    from r1kit.reason.sft import SFTTrainer

    overrides = {"sft": {"lora_rank": args.lora_rank, "max_steps": args.max_steps, "device": args.device}, "optim": {"lr": args.lr}}
    sections = load_sections(args.config, SFT_SECTIONS, overrides)
    SFTTrainer(args.model, args.data, sections["sft"], sections["optim"], args.out, resume=args.resume).train()
    return 0
