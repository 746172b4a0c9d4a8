"""The training configuration: one YAML file with a ``model:`` and a ``train:`` section.

``model:`` holds :class:`~r1kit.config.ModelConfig` fields (or ``train.init_from`` names a model
directory to start from); ``train:`` holds :class:`TrainConfig`. Both are validated at load.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Mapping

from r1kit.config import ModelConfig, _build, load_yaml
from r1kit.errors import ConfigError
from r1kit.model.sparsity import SparsityControl

PRECISIONS = ("fp32", "bf16", "fp16")
DATA_PARALLEL = ("ddp", "fsdp")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters and bookkeeping of a training run (defaults: the seed's §3.2 where it says)."""

    data: str
    out: str
    init_from: str | None = None
    seq_len: int = 256
    micro_batch_size: int = 8
    grad_accum: int = 1
    max_steps: int = 1000
    max_minutes: float | None = None
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 2000
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    precision: str = "fp32"
    activation_checkpointing: bool = False
    fused_kernels: bool = False  # on CUDA: r1kit.fused's Triton norms and activations, after their self-check
    sparsity_control: SparsityControl | None = dataclasses.field(default_factory=SparsityControl)
    eval_every: int = 100
    eval_batches: int = 16
    log_every: int = 10
    save_every: int = 200
    keep_last: int = 3
    seed: int = 0
    tensor_parallel: int = 1
    data_parallel: str = "ddp"
    device: str = "auto"
    threads: int | None = None

    def __post_init__(self) -> None:
        positive = ("seq_len", "micro_batch_size", "grad_accum", "max_steps", "eval_batches", "log_every", "save_every", "keep_last", "tensor_parallel")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"train.{name}={value!r} must be a positive integer")
        for name in ("warmup_steps", "eval_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ConfigError(f"train.{name}={getattr(self, name)!r} must be an integer >= 0")
        if not self.lr > 0:
            raise ConfigError(f"train.lr={self.lr} must be positive (the seed uses 3e-4)")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"train.min_lr={self.min_lr} must be between 0 and lr={self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"train.weight_decay={self.weight_decay} must be >= 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError(f"train.beta1/beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")
        if self.grad_clip < 0:
            raise ConfigError(f"train.grad_clip={self.grad_clip} must be >= 0 (0 turns clipping off)")
        if self.data_parallel not in DATA_PARALLEL:
            raise ConfigError(
                f"train.data_parallel={self.data_parallel!r} is not one of {DATA_PARALLEL}: ddp replicates the model on every "
                "process, fsdp shards parameters, gradients and optimizer state over them (FSDP2; needed with tensor_parallel)"
            )
        if self.precision not in PRECISIONS:
            raise ConfigError(f"train.precision={self.precision!r} is not one of {PRECISIONS}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(self.device)):
            raise ConfigError(f"train.device={self.device!r} must be auto (a GPU where there is one), cpu, cuda or cuda:N")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ConfigError(f"train.max_minutes={self.max_minutes} must be positive, or left out")
        if isinstance(self.sparsity_control, Mapping):
            object.__setattr__(self, "sparsity_control", _build(SparsityControl, self.sparsity_control, "train.sparsity_control"))

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.seq_len


def load_run_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> tuple[ModelConfig | None, TrainConfig]:
    """Read a run's YAML: (model config or None when ``init_from`` is used, train config)."""
    raw = load_yaml(path)
    unknown = sorted(set(raw) - {"model", "train"})
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {unknown}; a run config has `model:` and `train:`")
    train_raw = dict(raw.get("train") or {})
    train_raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    train = _build(TrainConfig, train_raw, where=f"{path} [train]")
    model = None
    if train.init_from is None:
        if "model" not in raw:
            raise ConfigError(f"{path}: give a `model:` section, or train.init_from with a model directory")
        model = ModelConfig.from_dict(raw["model"], where=f"{path} [model]")
    return model, train
