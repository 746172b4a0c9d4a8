"""`r1kit prepare`: the command line of the data pipeline.

Every ``PrepareConfig`` field is a flag (``min_tokens`` -> ``--min-tokens``); flags override the
YAML given with ``--config``, which overrides the defaults. This module must never hold pipeline
logic: it only builds the config and calls ``run_prepare``.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Mapping

from r1kit.config import load_yaml
from r1kit.data.config import PrepareConfig

_HELP = {
    "inputs": "files or folders to read (.txt/.md/code, .jsonl, .parquet); none = the embedded stdlib corpus",
    "output": "output folder (shards/, tokenizer.json, report.json, dropped.jsonl, lengths.png, work/)",
    "text_field": "field of .jsonl records / column of .parquet files that holds the text",
    "languages": "ISO 639-1 codes of the languages to keep (code passes by file type)",
    "language_threshold": "minimum detector confidence that a text is in one of --languages",
    "near_dup_threshold": "Jaccard similarity at or above which a document counts as a near-duplicate",
    "minhash_bands": "LSH bands (candidate probability 1-(1-J^rows)^bands)",
    "synonyms": "augmentation table as word=synonym pairs separated by commas, e.g. 不会=无法,可能=或许",
    "tokenizer": "use this existing tokenizer.json instead of training one",
    "engine": "where chunks run: local processes or a dask cluster",
    "workers": "worker processes (0 = one per CPU core)",
    "dask_address": "scheduler address of an existing Dask cluster (default: a LocalCluster of --workers)",
}


def _synonyms(text: str) -> dict[str, str]:
    pairs = [p for p in text.split(",") if p.strip()]
    if not all("=" in p for p in pairs):
        raise argparse.ArgumentTypeError(f"--synonyms {text!r}: write word=synonym pairs separated by commas")
    return dict(p.strip().split("=", 1) for p in pairs)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file of prepare options (top level or under `prepare:`)")
    hints = typing.get_type_hints(PrepareConfig)
    for field in dataclasses.fields(PrepareConfig):
        flag, hint = "--" + field.name.replace("_", "-"), hints[field.name]
        if type(None) in typing.get_args(hint):  # Optional[X]: the flag takes an X
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        help_ = f"{_HELP.get(field.name, field.name.replace('_', ' '))} (default: {default!r})"
        kw: dict[str, Any] = {"dest": field.name, "default": argparse.SUPPRESS, "help": help_}
        if hint is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif typing.get_origin(hint) is tuple:
            parser.add_argument(flag, nargs="*", metavar="X", **kw)
        elif hint is int or hint is float:
            parser.add_argument(flag, type=hint, **kw)
        elif typing.get_origin(hint) is Mapping:
            parser.add_argument(flag, type=_synonyms, metavar="A=B,...", **kw)
        else:  # str and optional str
            parser.add_argument(flag, **kw)


def config_from_args(args: argparse.Namespace) -> PrepareConfig:
    """Defaults, overridden by ``--config``, overridden by flags."""
    raw: dict[str, Any] = {}
    if getattr(args, "config", None):
        raw = load_yaml(args.config)
        if "prepare" in raw and isinstance(raw["prepare"], Mapping):
            raw = dict(raw["prepare"])
    names = {f.name for f in dataclasses.fields(PrepareConfig)}
    raw.update({k: v for k, v in vars(args).items() if k in names})
    return PrepareConfig.from_dict(raw, where=args.config or "r1kit prepare flags")


def run(args: argparse.Namespace) -> int:
    from r1kit.data.pipeline import run_prepare
    from r1kit.errors import R1kitError

    cfg = config_from_args(args)
    try:
        report = run_prepare(cfg)
    except OSError as exc:  # a full or failing disk: every file is written atomically, so a re-run resumes
        raise R1kitError(f"{exc}. Nothing half-written was kept: fix the cause (free space) and run the same "
                         "command again; it resumes at the stage (or shard) it reached") from exc
    print(f"{'stage':<12}{'in':>9}{'kept':>9}{'dropped':>9}  reasons")
    for s in report["stages"]:
        print(f"{s['stage']:<12}{s['in']:>9}{s['kept']:>9}{s['dropped']:>9}  {s['reasons'] or ''}")
    print(f"\n{'pass':<12}{'docs':>9}{'MB':>9}{'s':>8}{'docs/s':>10}{'MB/s':>8}")
    for t in report["throughput"]:
        print(f"{t['stage']:<12}{t['documents']:>9}{t['MB']:>9.2f}{t['seconds']:>8.2f}{t['docs_per_s']:>10.1f}{t['MB_per_s']:>8.2f}")
    sh = report["shards"]
    print(f"\nshards ({sh['dtype']}): train {sh['train']['tokens']} tokens / {sh['train']['documents']} docs, "
          f"val {sh['val']['tokens']} tokens / {sh['val']['documents']} docs -> {cfg.output}/shards")
    print(f"report: {cfg.output}/report.json, dropped: {cfg.output}/dropped.jsonl, histogram: {cfg.output}/lengths.png")
    return 0
