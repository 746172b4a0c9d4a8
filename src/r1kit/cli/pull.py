"""`r1kit pull NAME`: fetch a known model or a Hugging Face repo into r1kit's cache (or --out)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from r1kit.checkpoints.pull import KNOWN_MODELS

    names = ", ".join(sorted(KNOWN_MODELS))
    parser.add_argument("name", nargs="?", help=f"a known model ({names}) or a Hugging Face repo id (org/name)")
    parser.add_argument("--out", help="also copy the model directory here")
    parser.add_argument("--list", action="store_true", help="list the known models and exit")


def run(args: argparse.Namespace) -> int:
    from r1kit.checkpoints.pull import KNOWN_MODELS, pull
    from r1kit.errors import ConfigError

    if args.list or args.name is None:
        if args.name is None and not args.list:
            raise ConfigError("give a model name or a Hugging Face repo id, or --list")
        for model in KNOWN_MODELS.values():
            print(f"{model.name:32s} {model.description}")
        return 0
    print(pull(args.name, args.out))
    return 0
