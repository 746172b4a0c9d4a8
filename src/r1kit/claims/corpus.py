"""The data the experiments train and measure on: the embedded stdlib corpus, prepared once.

Training data is ``r1kit prepare`` run on the standard library's sources (or, for the smallest
scale, a few of its packages) into ``<out>/work/data``; the trainer packs those documents into
long blocks of the run's sequence length, and the val split's blocks are the held-out long
sequences. The GPTQ experiment measures on raw text from packages other than the ones it
calibrates on. This module must never train or evaluate.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

from r1kit.claims.scale import Scale

CALIBRATION_PACKAGES = ("email", "json")
HELD_OUT_PACKAGES = ("http", "urllib")


def stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def prepare_shards(out: Path, scale: Scale, log) -> Path:
    """Token shards of the stdlib corpus for this scale (resumed or reused when already prepared)."""
    from r1kit.data.config import PrepareConfig
    from r1kit.data.pipeline import run_prepare

    target = Path(out) / "work" / "data"
    inputs = tuple(str(stdlib() / name) for name in scale.corpus_slice)
    config = PrepareConfig(
        inputs=inputs, output=str(target), vocab_size=scale.vocab_size, min_tokens=64, max_tokens=16384,
        val_fraction=0.25 if inputs else 0.02, workers=1 if inputs else 0, progress=os.environ.get("R1KIT_NO_PROGRESS") != "1",
    )  # fmt: skip
    run_prepare(config, log=log)  # finished stages are reused: a second experiment pays nothing
    return target / "shards"


def package_text(packages: tuple[str, ...], max_chars: int) -> str:
    """The ``.py`` sources of stdlib ``packages``, in a fixed order, up to ``max_chars`` characters."""
    parts, size = [], 0
    for package in packages:
        for file in sorted((stdlib() / package).rglob("*.py")):
            text = file.read_text(encoding="utf-8", errors="replace")
            parts.append(text)
            size += len(text)
            if size >= max_chars:
                return "\n".join(parts)[:max_chars]
    return "\n".join(parts)
