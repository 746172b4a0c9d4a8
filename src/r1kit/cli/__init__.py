"""`r1kit <verb>`: the command line. Each verb is a module of this package, a thin shell over the
stage it drives (``prepare`` over :mod:`r1kit.data`, ``quantize`` over :mod:`r1kit.quant`, ...).

A verb module exposes ``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported only
for the verb being run, so ``r1kit --help`` and the light verbs do not pay for the heavy ones.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from r1kit import __version__
from r1kit.errors import R1kitError

# verb -> (module, one-line help). Order is the order users meet them in.
VERBS: dict[str, tuple[str, str]] = {
    "quickstart": ("r1kit.cli.quickstart", "the whole reproduction on the embedded corpus: prepare, train, quantize, evaluate, report"),
    "prepare": ("r1kit.cli.prepare", "clean, filter, deduplicate and tokenize a corpus into training shards"),
    "pull": ("r1kit.cli.pull", "fetch a known model or a Hugging Face repo into r1kit's cache"),
    "convert": ("r1kit.cli.convert", "convert a GGUF file to a model directory, or a model directory to GGUF"),
    "init": ("r1kit.cli.init", "create a randomly initialised model directory from a config"),
    "train": ("r1kit.cli.train", "train a model on token shards (single process or under torchrun)"),
    "eval": ("r1kit.cli.eval", "evaluate a model: perplexity overall and by position"),
    "quantize": ("r1kit.cli.quantize", "quantize a model to 4-bit GPTQ (or RTN) and write a GPTQ checkpoint"),
    "serve": ("r1kit.cli.serve", "serve a model over an OpenAI-compatible HTTP API (health, metrics, streaming)"),
    "generate": ("r1kit.cli.generate", "generate text from a model directory (the engine; --reference for the plain decoding loop)"),
    "bench": ("r1kit.cli.bench", "measure the engine's throughput and latency on a model directory or config"),
    "sft": ("r1kit.cli.sft", "supervised fine-tuning on chats: loss on assistant tokens, packing, full or LoRA (merged on save)"),
    "cold-start": ("r1kit.cli.cold_start", "worked solutions of a task's problems in R1's <think> format, verified, as chats for sft"),
    "grpo": ("r1kit.cli.grpo", "reinforcement learning with verifiable rewards (GRPO) on a task: rollouts on the engine, metrics, report"),
    "claims": ("r1kit.cli.claims", "measure every figure the guide states and write claims.md / claims.html (budgeted, resumable)"),
    "apps": ("r1kit.cli.apps", "the guide's applications: intent recognition, the support assistant, code completion, test generation"),
    "plan": ("r1kit.cli.plan", "the memory a model needs (weights, KV cache, training) and the parallel layout for given GPUs"),
}


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="r1kit",
        description="Build, train, compress, serve and apply R1-style reasoning language models.",
    )
    parser.add_argument("--version", action="version", version=f"r1kit {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", title="verbs")
    for name, (module, help_) in VERBS.items():
        verb_parser = sub.add_parser(name, help=help_, description=help_)
        if name == verb:
            importlib.import_module(module).add_arguments(verb_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verb = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(verb if verb in VERBS else None)
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return 2
    module = importlib.import_module(VERBS[args.verb][0])
    try:
        return int(module.run(args) or 0)
    except (R1kitError, FileNotFoundError) as exc:
        print(f"r1kit {args.verb}: error: {exc}", file=sys.stderr)
        return 2

