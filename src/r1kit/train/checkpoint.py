"""Training checkpoints: a Hugging Face model directory plus the loop's state, written atomically.

``<out>/checkpoints/step-NNNNNNN/`` holds ``config.json`` + ``model.safetensors`` (what every
other tool reads) and ``trainer_state.pt`` (optimizer, step, RNG, data position, sparsity
controller). A checkpoint is written under a temporary name and renamed when complete, so a run
killed at any moment leaves only whole checkpoints; the newest complete one is where ``--resume``
starts. Only the last ``keep`` are kept.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

PREFIX = "step-"


def checkpoint_dir(out: str | Path) -> Path:
    return Path(out) / "checkpoints"


def save_checkpoint(out: str | Path, step: int, model, state: dict[str, Any], keep: int, extra_files: list[Path] = ()) -> Path:
    """Write checkpoint ``step`` and prune to the newest ``keep``; returns its directory."""
    root = checkpoint_dir(out)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:07d}"
    tmp = root / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    torch.save(state, tmp / "trainer_state.pt")
    for file in extra_files:
        shutil.copyfile(file, tmp / Path(file).name)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in list_checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(out: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories of an interrupted save are ignored)."""
    root = checkpoint_dir(out)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "trainer_state.pt").is_file())


def latest_checkpoint(out: str | Path) -> Path | None:
    found = list_checkpoints(out)
    return found[-1] if found else None


def load_trainer_state(path: Path) -> dict[str, Any]:
    return torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
