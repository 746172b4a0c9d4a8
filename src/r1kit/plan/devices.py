"""The devices a plan is made for: a small typed catalog, and the ``--gpus`` grammar over it.

``--gpus`` is ``N x NAME`` (``2xA100-80G``, ``4xH100-80G``; ``N x`` may be left out for one device) or
``cpu``, this machine's memory as ``/proc/meminfo`` states it. Names are matched without regard to
case. Memory is the total a device reports (``nvidia-smi``'s MiB), not what is free: the planner keeps
its own headroom. This module never touches torch or a GPU: a plan for hardware one does not have is
the point.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from pathlib import Path

from r1kit.errors import ConfigError

MIB = 2**20


@dataclasses.dataclass(frozen=True)
class Device:
    """One accelerator model: its name in ``--gpus``, what it is, and its memory in bytes."""

    name: str
    description: str
    memory: int
    kind: str = "gpu"  # gpu | cpu (where the memory is the machine's RAM)


CATALOG: dict[str, Device] = {
    d.name.lower(): d
    for d in (
        Device("A100-40G", "NVIDIA A100 40GB", 40960 * MIB),
        Device("A100-80G", "NVIDIA A100 80GB", 81920 * MIB),
        Device("H100-80G", "NVIDIA H100 80GB (SXM/PCIe)", 81559 * MIB),
        Device("H200", "NVIDIA H200 141GB", 143771 * MIB),
        Device("L4", "NVIDIA L4 24GB", 23034 * MIB),
        Device("RTX4090", "NVIDIA GeForce RTX 4090 24GB", 24564 * MIB),
        Device("Orin-64G", "NVIDIA Jetson AGX Orin 64GB (nominal; the memory is shared with its CPU)", 65536 * MIB),
    )
}  # fmt: skip

_ALIASES = {"rtx-4090": "rtx4090", "4090": "rtx4090", "h200-141g": "h200", "h100": "h100-80g", "orin": "orin-64g"}
_GRAMMAR = re.compile(r"^\s*(?:(\d+)\s*[xX×*]\s*)?([A-Za-z0-9][A-Za-z0-9_.-]*)\s*$")


@dataclasses.dataclass(frozen=True)
class Devices:
    """``count`` devices of one kind: what ``--gpus`` names."""

    count: int
    device: Device

    @property
    def label(self) -> str:
        return "cpu" if self.device.kind == "cpu" else f"{self.count}x{self.device.name}"


def choices() -> str:
    """The names ``--gpus`` accepts, for help texts and errors."""
    return ", ".join([d.name for d in CATALOG.values()] + ["cpu"])


def parse_gpus(text: str, meminfo: str | Path = "/proc/meminfo") -> Devices:
    """``2xA100-80G`` -> 2 x the A100 80GB; ``H200`` -> one; ``cpu`` -> this machine (``meminfo``).

    Raises :class:`ConfigError` (``param='--gpus'``) naming the accepted forms and devices."""
    match = _GRAMMAR.match(text or "")
    if match is None:
        raise ConfigError(f"--gpus={text!r} is not N x NAME (e.g. 2xA100-80G) or cpu; devices: {choices()}", param="--gpus")
    count, name = match.group(1), match.group(2).lower()
    if name == "cpu":
        if count not in (None, "1"):
            raise ConfigError(f"--gpus={text!r}: cpu means this one machine; give it without a count", param="--gpus")
        return Devices(1, Device("cpu", "this machine's memory (/proc/meminfo MemTotal)", cpu_memory(meminfo), kind="cpu"))
    device = CATALOG.get(_ALIASES.get(name, name))
    if device is None:
        close = [d.name for key, d in CATALOG.items() if key.startswith(name)]  # A100 -> A100-40G or A100-80G
        close = close or [CATALOG[_ALIASES.get(c, c)].name for c in difflib.get_close_matches(name, list(CATALOG) + list(_ALIASES), n=1)]
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise ConfigError(f"--gpus={text!r}: unknown device {match.group(2)!r}{hint}; devices: {choices()}", param="--gpus")
    n = int(count) if count is not None else 1
    if n < 1:
        raise ConfigError(f"--gpus={text!r}: the count must be at least 1", param="--gpus")
    return Devices(n, device)


def cpu_memory(meminfo: str | Path = "/proc/meminfo") -> int:
    """This machine's total memory in bytes (``MemTotal``)."""
    try:
        text = Path(meminfo).read_text()
    except OSError as exc:
        raise ConfigError(f"--gpus=cpu needs {meminfo} to read this machine's memory ({exc}); name a device instead", param="--gpus") from None
    found = re.search(r"^MemTotal:\s*(\d+)\s*kB", text, re.MULTILINE)
    if found is None:
        raise ConfigError(f"{meminfo} has no MemTotal line; name a device in --gpus instead", param="--gpus")
    return int(found.group(1)) * 1024
