"""`r1kit apps <app-verb>`: the guide's applications. Each app verb is a module of this package with the
same shape as a top-level verb (``add_arguments(parser)`` and ``run(args) -> int``), imported only when run."""

from __future__ import annotations

import argparse
import importlib

# app verb -> (module, one-line help)
APP_VERBS: dict[str, tuple[str, str]] = {
    "intent": ("r1kit.cli.apps_intent", "train or evaluate the customer-service intent recogniser"),
    "support": ("r1kit.cli.apps_support", "the customer-service assistant in the terminal"),
    "complete": ("r1kit.cli.apps_complete", "complete code at a cursor (fill-in-the-middle where the model has it)"),
    "testgen": ("r1kit.cli.apps_testgen", "generate pytest tests for a module and keep those that pass in a sandbox"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="app_verb", metavar="APP", title="apps")
    for name, (module, help_) in APP_VERBS.items():
        importlib.import_module(module).add_arguments(sub.add_parser(name, help=help_, description=help_))


def run(args: argparse.Namespace) -> int:
    from r1kit.errors import ConfigError

    if args.app_verb is None:
        raise ConfigError(f"name an app verb: one of {', '.join(APP_VERBS)} (r1kit apps --help)")
    return int(importlib.import_module(APP_VERBS[args.app_verb][0]).run(args) or 0)
