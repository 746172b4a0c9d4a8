"""`r1kit train`: train the model from a run config (YAML with `model:` and `train:` sections).

Every ``train:`` field can be overridden by a flag of the same name (``max_steps`` -> ``--max-steps``).
Started under ``torchrun --nproc-per-node N`` it trains data-parallel.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing

from r1kit.train.config import TrainConfig

_SKIP = {"sparsity_control"}  # a nested section: set it in the YAML


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="run config YAML (`model:` and `train:` sections), e.g. configs/tiny-cpu.yaml")
    parser.add_argument("--resume", action="store_true", help="continue from the newest intact checkpoint under --out (damaged newer ones are skipped, saying why)")
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        if field.name in _SKIP:
            continue
        hint = hints[field.name]
        base = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
        flag = "--" + field.name.replace("_", "-")
        default = field.default if field.default is not dataclasses.MISSING else None
        help_ = f"override train.{field.name} (config default: {default!r})"
        if base is bool:
            parser.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            parser.add_argument(flag, dest=field.name, type=base, default=None, help=help_)


def run(args: argparse.Namespace) -> int:
    from r1kit.errors import R1kitError
    from r1kit.train.config import load_run_config
    from r1kit.train.trainer import Trainer

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if f.name not in _SKIP}
    model_config, train_config = load_run_config(args.config, overrides)
    try:
        Trainer(model_config, train_config, resume=args.resume).run()
    except OSError as exc:  # a full or failing disk: checkpoints are atomic, so the last one written is whole
        raise R1kitError(f"{exc}. Fix the cause (free space) and continue from the last checkpoint with --resume") from exc
    return 0
