"""The optimizer's state in a checkpoint, through torch.distributed.checkpoint (DCP): written by any
number of processes, each its own shard, and read back by any other number, each taking the slices
its parameters hold now (a single process, DDP, tensor parallel, FSDP2, FSDP2 + tensor parallel).

The state is keyed by parameter name (``get_optimizer_state_dict``), not by position, and holds
tensors only: the hyper-parameters come from the run's config, and the flags of its parameter groups
(fused, foreach) from the layout of the run that reads it. DCP's index (``.metadata``) is a pickle:
it is read with an unpickler that builds only DCP's own metadata records, so opening a checkpoint
never runs code from it, as for the rest of the checkpoint.
"""

from __future__ import annotations

import contextlib
import pickle
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import (
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from r1kit.errors import CheckpointError

FOLDER = "optimizer"

_METADATA_RECORDS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata", "ChunkStorageMetadata",
        "BytesStorageMetadata", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    "pathlib._local": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
}  # fmt: skip


def save_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Write ``optimizer``'s state into ``directory`` (a collective under torch.distributed: every rank calls it)."""
    state = get_optimizer_state_dict(model, optimizer)["state"]
    for name, entries in state.items():
        for key, value in entries.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"optimizer state {name}.{key} is a {type(value).__name__}: only tensors are checkpointed")
    with _single_process_is_meant():
        dcp.save({"optimizer": state}, checkpoint_id=directory)


def load_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Fill ``optimizer`` (built over ``model`` as this run lays it out) from ``directory`` (a collective)."""
    # the fresh optimizer's own state dict (zeros, placed as this run shards them) is the template DCP fills
    template = get_optimizer_state_dict(model, optimizer)
    try:
        with _single_process_is_meant():
            dcp.load({"optimizer": template["state"]}, storage_reader=_RecordsOnlyReader(directory))
    except CheckpointException as exc:  # DCP gathers every rank's failure (exception, traceback) into this one
        reasons = "; ".join(f"rank {rank}: {failure[0]}" for rank, failure in sorted(exc.failures.items()))
        raise CheckpointError(f"could not read the optimizer state in {directory}: {reasons}") from exc
    set_optimizer_state_dict(model, optimizer, template)


@contextlib.contextmanager
def _single_process_is_meant() -> Iterator[None]:
    """Silence DCP's warning that, without a process group, it reads or writes as one process: that is
    how a run of one process checkpoints, not a mistake, and the warning would come at every save."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


class _RecordsOnlyReader(FileSystemReader):
    """DCP's file reader, reading its ``.metadata`` pickle with :class:`_RecordsUnpickler`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            try:
                metadata = _RecordsUnpickler(stream).load()
            except pickle.UnpicklingError as exc:
                raise CheckpointError(f"{path} was refused unopened: {exc}. Resume from a checkpoint you trust") from exc
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path} holds a {type(metadata).__name__}, not DCP metadata")
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _RecordsUnpickler(pickle.Unpickler):
    """Builds DCP's metadata records, torch sizes, dtypes and layouts, paths; refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _METADATA_RECORDS.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which DCP's metadata never holds")

