"""Training checkpoints: a Hugging Face model directory plus the loop's state, written atomically and verified.

``<out>/checkpoints/step-NNNNNNN/`` holds ``config.json`` + ``model.safetensors`` (what every
other tool reads, and what a resumed run starts from), ``trainer_state.pt`` (step, RNG, data
position, sparsity controller; the optimizer too for the runs of reason/), the trainer's
``optimizer/`` (a torch.distributed.checkpoint folder, see :mod:`r1kit.train.optimizer_state`, so a
run saved by some number of processes resumes on any other) and ``manifest.json`` (every other
file's size and xxh3-128 hash). A checkpoint is written under a
temporary name, synced to disk, given its manifest last and renamed, so a run killed at any moment
leaves only whole checkpoints. ``--resume`` starts from the newest checkpoint that still matches its
manifest and says which newer ones it skipped and why (a disk that died mid-write, a truncated
copy). Only the last ``keep`` are kept.

The trainer state holds only tensors and plain Python data (numbers, strings, lists, tuples, dicts)
and is read with ``torch.load(weights_only=True)``: opening a checkpoint from someone else never
runs code from it.
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
import xxhash

from r1kit.data.records import write_json
from r1kit.errors import CheckpointError, ConfigError

PREFIX = "step-"
STATE_FILE = "trainer_state.pt"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "r1kit-checkpoint-v1"
_HASH_CHUNK = 8 << 20
_PLAIN = (bool, int, float, str, type(None), torch.Tensor)


def checkpoint_dir(out: str | Path) -> Path:
    return Path(out) / "checkpoints"


def check_run_dir(out: str | Path) -> None:
    """Fail before training when ``out`` or its checkpoints folder exists but is not a folder.

    Otherwise the first save, possibly hours in, would die on it.
    """
    for path in (Path(out), checkpoint_dir(out)):
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{path} exists and is not a folder: move it away or set train.out (--out) to another folder")


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
    write_shards: Callable[[Path], None] | None = None,
) -> Path:
    """Write checkpoint ``step`` and prune to the newest ``keep``; returns its directory.

    A run of several processes calls this on every rank (``rank``, ``barrier``): rank 0 writes the
    model (``model_state``: its gathered weights when they are sharded) and the trainer state, every
    rank calls ``write_shards`` with the temporary folder (the optimizer's shards), and rank 0 writes
    the manifest and renames once all have written. A failed write (disk full, I/O error) removes
    the partial checkpoint and raises :class:`CheckpointError`; the checkpoints written before stay
    as they were.
    """
    _check_plain(state, "trainer state")
    root = checkpoint_dir(out)
    final = root / f"{PREFIX}{step:07d}"
    tmp = root / f".{final.name}.tmp"
    try:
        if rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp, state=model_state)
            for file in extra_files:
                shutil.copyfile(file, tmp / Path(file).name)
            torch.save(state, tmp / STATE_FILE)
        barrier()
        if write_shards is not None:
            write_shards(tmp)
        barrier()
        if rank == 0:
            write_manifest(tmp)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            _fsync_dir(root)
            for old in list_checkpoints(out)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"could not write checkpoint {final}: {exc}. The checkpoints written before are untouched; "
            "free space (or fix the disk) and continue with --resume"
        ) from exc
    barrier()
    return final


def list_checkpoints(out: str | Path) -> list[Path]:
    """Checkpoint folders, oldest first (temporary folders of an interrupted save are ignored).

    Whether each is intact is for :func:`resume_point` to check.
    """
    root = checkpoint_dir(out)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if re.fullmatch(rf"{PREFIX}\d+", p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name.removeprefix(PREFIX)))  # by number: step 10**7 has 8 digits


def resume_point(out: str | Path, log: Callable[[str], None] = print) -> tuple[Path, dict[str, Any]] | None:
    """The newest intact checkpoint under ``out`` and its trainer state, or None when there is none.

    Newer checkpoints that fail verification are skipped with a message saying why; when every
    checkpoint fails, raises :class:`CheckpointError` listing them.
    """
    found = list_checkpoints(out)
    skipped: list[str] = []
    for path in reversed(found):
        try:
            verify_checkpoint(path, log)
            return path, load_trainer_state(path)
        except CheckpointError as exc:
            log(f"skipping checkpoint {path}: {exc}")
            skipped.append(f"{path.name}: {exc}")
    if found:
        raise CheckpointError(
            f"no intact checkpoint under {checkpoint_dir(out)} to resume from ({'; '.join(skipped)}). "
            "Move that folder away and train without --resume to start over"
        )
    return None


def write_manifest(directory: Path) -> None:
    """Sync every file of ``directory`` to disk and record its size and hash in ``manifest.json``."""
    files = {}
    for file in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        with open(file, "rb") as f:
            os.fsync(f.fileno())
        files[file.relative_to(directory).as_posix()] = {"size": file.stat().st_size, "xxh3_128": _hash(file)}
    write_json(directory / MANIFEST, {"format": MANIFEST_FORMAT, "files": files})
    _fsync_dir(directory)


def verify_checkpoint(path: Path, log: Callable[[str], None] = print) -> None:
    """Raise :class:`CheckpointError` naming the first file of ``path`` that does not match its manifest.

    A checkpoint from before manifests were written has its weight files' headers checked instead.
    """
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        log(f"{path} has no {MANIFEST} (written by an older r1kit): checking that its files load instead of their hashes")
        _check_weights_load(path)
        return
    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{manifest_file} is unreadable ({exc})") from exc
    if manifest.get("format") != MANIFEST_FORMAT:
        raise CheckpointError(f"{manifest_file} has format {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}")
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{name} is missing")
        size = file.stat().st_size
        if size != expected["size"]:
            raise CheckpointError(f"{name} has {size} bytes, its manifest says {expected['size']} (truncated or overwritten)")
        if _hash(file) != expected["xxh3_128"]:
            raise CheckpointError(f"{name} does not match the checksum in its manifest (corrupted on disk)")


def load_trainer_state(path: Path) -> dict[str, Any]:
    """The trainer state of checkpoint ``path``, read as plain data only (never runs code)."""
    file = path / STATE_FILE
    if not file.is_file():
        raise CheckpointError(f"{file.name} is missing")
    if torch.distributed.is_available():
        importlib.import_module("torch.distributed.tensor")  # registers DTensors (an older r1kit's tensor-parallel state) as safe to load
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refuses any object that is not a tensor or plain data: r1kit never writes one
        raise CheckpointError(
            f"{file.name} holds Python objects, not only tensors and plain data, so it was refused unopened: "
            f"it was not written by r1kit or was altered. Resume from a checkpoint you trust ({exc})"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{file.name} is truncated or corrupt ({exc})") from exc


def _check_weights_load(path: Path) -> None:
    from safetensors import SafetensorError, safe_open

    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise CheckpointError("it has no *.safetensors weights")
    for file in weights:
        try:
            with safe_open(file, "pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{file.name} is truncated or corrupt ({exc})") from exc


def _check_plain(value: Any, where: str) -> None:
    """Raise TypeError naming the first entry that ``torch.load(weights_only=True)`` would refuse."""
    if isinstance(value, dict):
        for key, item in value.items():
            _check_plain(key, f"{where} key")
            _check_plain(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
    elif not isinstance(value, _PLAIN):
        raise TypeError(f"{where} is a {type(value).__name__}: store tensors and plain Python data only, so resume can load it safely")


def _hash(file: Path) -> str:
    h = xxhash.xxh3_128()
    with open(file, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(directory: Path) -> None:
    # the rename and the new names are durable only once the folder itself is synced
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
