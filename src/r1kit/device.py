"""Where a model runs: the one check of a device a user names (a CLI's ``--device``, ``LLM(device=)``,
``train.device``), so a typo or a GPU that is not there is a clear error up front, not a failure
deep inside the first tensor move."""

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
