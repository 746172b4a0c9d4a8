"""`r1kit init`: write a randomly initialised model directory (config.json + weights [+ tokenizer]).

It is how a training run or a benchmark starts from a config; it never overwrites a model silently.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
from pathlib import Path

import torch

from r1kit.config import ModelConfig
from r1kit.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML file with the model fields (at the top level or under `model:`)")
    parser.add_argument("--out", required=True, help="model directory to create")
    parser.add_argument("--tokenizer", help="tokenizer.json to copy in; its vocabulary size and special ids override the config's")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random initialisation (default 0)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing model directory")


def run(args: argparse.Namespace) -> int:
    from r1kit.model.transformer import R1kitForCausalLM

    out = Path(args.out)
    if (out / "config.json").exists() and not args.force:
        raise ConfigError(f"{out} already holds a model; pass --force to overwrite it or choose another --out")
    config = ModelConfig.from_yaml(args.config)
    if args.tokenizer:
        from r1kit.tokenizer import BOS, EOS, PAD, load_tokenizer

        tok = load_tokenizer(args.tokenizer)
        config = dataclasses.replace(
            config,
            vocab_size=tok.get_vocab_size(),
            bos_token_id=tok.token_to_id(BOS),
            eos_token_id=tok.token_to_id(EOS),
            pad_token_id=tok.token_to_id(PAD),
        )
    torch.manual_seed(args.seed)
    model = R1kitForCausalLM(config)
    model.save_pretrained(out)
    if args.tokenizer:
        src = Path(args.tokenizer)
        shutil.copyfile(src / "tokenizer.json" if src.is_dir() else src, out / "tokenizer.json")
    print(f"wrote {out}: {config.num_parameters() / 1e6:.2f}M parameters, layers {list(zip(config.attention, config.ffn))}")
    return 0
