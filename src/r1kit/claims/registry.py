"""The experiments in report order, each a module with ``NAME``, ``CLAIMS`` and ``verdicts(result)``."""

from __future__ import annotations

from types import ModuleType

from r1kit.claims import attention, gptq, hardware, intent, sparsity

EXPERIMENTS: dict[str, ModuleType] = {m.NAME: m for m in (attention, sparsity, gptq, intent, hardware)}
