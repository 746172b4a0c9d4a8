"""One way in for every verb: a model argument (directory, ``.gguf`` file or known name) to a model directory,
and one :func:`load_model` for every kind of checkpoint (float safetensors, GPTQ, GGUF)."""

from __future__ import annotations

from pathlib import Path

import torch

from r1kit.errors import CheckpointError


def resolve_model(model: str | Path) -> Path:
    """The model directory for ``model``: itself, a GGUF file's cached view, or a pulled model in the cache.

    A short name (``smollm2-135m-instruct``) or a Hugging Face id is looked up only when no such path exists,
    and only where r1kit's cache (or the local Hugging Face cache) already holds it: run ``r1kit pull`` first.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise CheckpointError(f"{path} is a file but not a .gguf; give a model directory (config.json + weights) or a GGUF file")
        from r1kit.checkpoints.gguf_convert import gguf_view

        return gguf_view(path)
    if path.is_absolute() or str(model).startswith((".", "~")) or path.suffix.lower() == ".gguf":
        raise CheckpointError(f"{path} does not exist; give a model directory (config.json + weights), a .gguf file or a pulled model name")
    from r1kit.checkpoints.pull import cached_pull

    found = cached_pull(str(model))
    if found is None:
        raise CheckpointError(
            f"model {model} not found: give a model directory, a .gguf file, or a model name fetched with `r1kit pull {model}`"
        )
    return found


def load_model(model: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """The r1kit model of any checkpoint :func:`resolve_model` accepts."""
    from r1kit.checkpoints.gguf_convert import load_gguf_model, view_source
    from r1kit.model.hf import load_model as load_float
    from r1kit.quant.checkpoint import is_gptq_checkpoint, load_quantized

    folder = resolve_model(model)
    source = view_source(folder)
    if source is not None:
        return load_gguf_model(source, dtype=dtype, device=device)
    if is_gptq_checkpoint(folder):  # GPTQ weights load into int4 layers (r1kit.quant)
        return load_quantized(folder, dtype=dtype, device=device)
    return load_float(folder, dtype=dtype, device=device)
