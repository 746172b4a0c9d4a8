"""Where a model runs and in which dtype: the one check of a device or dtype a user names (a CLI's
``--device``/``--dtype``, ``LLM(device=, dtype=)``, ``train.device``), so a typo or a GPU that is not
there is a clear error up front, not a failure deep inside the first tensor move."""

from __future__ import annotations

import torch

from r1kit.errors import ConfigError


def resolve_device(name: str | torch.device, what: str = "device") -> torch.device:
    """The torch device ``name`` means, checked: a device string torch knows and, for CUDA, a GPU
    this process can see; ``auto`` is the GPU where there is one, else the CPU. ``what`` names the
    setting in the error (``--device``, ``train.device``)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"{what}={name!r} is not a device torch knows; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"{what}={name!r}, but this torch ({torch.__version__}) sees no CUDA GPU (a CPU build, or no driver); use cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"{what}={name!r}, but only {torch.cuda.device_count()} GPU(s) are visible (cuda:0 ...)")
    return device


# the weight dtypes r1kit loads and saves, by the names config.json's torch_dtype and --dtype use
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)  # what a dtype setting accepts; auto: the checkpoint's own


def resolve_dtype(name_or_dtype: str | torch.dtype | None, setting_name: str = "dtype") -> torch.dtype | None:
    """The torch dtype a setting means; None for ``auto`` (or None): keep the checkpoint's. An unknown
    name raises :class:`ConfigError` whose ``param`` is ``setting_name`` (``--dtype``, ``dtype``)."""
    if isinstance(name_or_dtype, torch.dtype) or name_or_dtype is None:
        return name_or_dtype
    if name_or_dtype == "auto":
        return None
    if name_or_dtype not in DTYPES:
        raise ConfigError(f"{setting_name}={name_or_dtype!r} must be one of {list(DTYPE_CHOICES)}", param=setting_name)
    return DTYPES[name_or_dtype]
