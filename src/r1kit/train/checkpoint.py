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
from typing import Any, Callable

import torch

from r1kit.errors import CheckpointError

PREFIX = "step-"


def checkpoint_dir(out: str | Path) -> Path:
    return Path(out) / "checkpoints"


def save_checkpoint(
    out: str | Path,
    step: int,
    model,
    state: dict[str, Any],
    keep: int,
    extra_files: list[Path] = (),
    model_state: dict[str, torch.Tensor] | None = None,
    rank: int = 0,
    barrier: Callable[[], None] = lambda: None,
) -> Path:
    """Write checkpoint ``step`` and prune to the newest ``keep``; returns its directory.

    Tensor-parallel runs call this on every rank (``rank``, ``barrier``): rank 0 writes the gathered
    model, each rank its own optimizer shard, and rank 0 renames once all have written.
    """
    root = checkpoint_dir(out)
    final = root / f"{PREFIX}{step:07d}"
    tmp = root / f".{final.name}.tmp"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, state=model_state)
        for file in extra_files:
            shutil.copyfile(file, tmp / Path(file).name)
    barrier()
    torch.save(state, tmp / state_file(rank))
    barrier()
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def state_file(rank: int) -> str:
    return "trainer_state.pt" if rank == 0 else f"trainer_state.rank{rank}.pt"


def list_checkpoints(out: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories of an interrupted save are ignored)."""
    root = checkpoint_dir(out)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "trainer_state.pt").is_file())


def latest_checkpoint(out: str | Path) -> Path | None:
    found = list_checkpoints(out)
    return found[-1] if found else None


def load_trainer_state(path: Path, rank: int = 0) -> dict[str, Any]:
    file = path / state_file(rank)
    if not file.is_file():
        raise CheckpointError(f"{file} is missing: resume a tensor-parallel run with the same number of processes")
    return torch.load(file, map_location="cpu", weights_only=False)
