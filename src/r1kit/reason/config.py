"""The configurations of reasoning training: one YAML per run, validated at load.

``r1kit grpo`` reads ``task:`` (:class:`~r1kit.reason.tasks.TaskConfig`), ``grpo:``
(:class:`GRPOConfig`) and ``optim:`` (:class:`OptimConfig`); ``r1kit sft`` reads ``sft:``
(:class:`SFTConfig`) and ``optim:``. Every value has a default, so a run may give only what it changes.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from r1kit.config import _build, load_yaml
from r1kit.errors import ConfigError
from r1kit.reason.grpo_loss import AGGREGATIONS
from r1kit.reason.tasks import TaskConfig
from r1kit.train.config import PRECISIONS


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW and its schedule (linear warm-up, cosine to ``min_lr``), as the trainer runs them."""

    lr: float = 1e-6
    min_lr: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    grad_clip: float = 1.0
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if not self.lr > 0 or not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"optim.lr={self.lr} must be positive and optim.min_lr={self.min_lr} between 0 and it", param="optim.lr")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("optim.warmup_steps, weight_decay and grad_clip must be >= 0", param="optim")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError(f"optim.beta1/beta2 must be in [0, 1), got {self.beta1}, {self.beta2}", param="optim.beta1")
        if self.precision not in PRECISIONS[:2]:
            raise ConfigError(f"optim.precision={self.precision!r} must be fp32 or bf16 (autocast)", param="optim.precision")


def _positive(section: str, obj: Any, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{section}.{name}={value!r} must be a positive integer", param=f"{section}.{name}")


def _device(section: str, device: str) -> None:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(device)):
        raise ConfigError(f"{section}.device={device!r} must be auto, cpu, cuda or cuda:N", param=f"{section}.device")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """One GRPO run: per step ``prompts_per_step`` prompts (over all ranks), ``group_size``
    completions each, then ``mu`` optimisation passes over them in micro-batches."""

    prompts_per_step: int = 8
    group_size: int = 8
    max_new_tokens: int = 128
    max_prompt_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    mu: int = 1
    micro_batch_size: int = 16
    clip_low: float = 0.2
    clip_high: float | None = None
    beta: float = 0.0
    aggregation: str = "token-mean"
    scale_rewards: bool = True
    max_steps: int = 100
    max_minutes: float | None = None
    eval_every: int = 10
    eval_problems: int | None = None  # default: the whole held-out set
    log_every: int = 1
    save_every: int = 10
    keep_last: int = 2
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    think_prefix: bool = False  # open the answer with "<think>\n" after the chat template's generation prompt

    def __post_init__(self) -> None:
        _positive("grpo", self, ("prompts_per_step", "group_size", "max_new_tokens", "max_prompt_tokens", "mu", "micro_batch_size", "max_steps", "log_every", "save_every", "keep_last"))
        if self.group_size < 2:
            raise ConfigError(f"grpo.group_size={self.group_size}: GRPO compares completions of one prompt, so it needs at least 2", param="grpo.group_size")
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"grpo.aggregation={self.aggregation!r} is not one of {AGGREGATIONS}", param="grpo.aggregation")
        if not 0 < self.clip_low < 1 or (self.clip_high is not None and self.clip_high <= 0):
            raise ConfigError(f"grpo.clip_low={self.clip_low} must be in (0, 1) and clip_high positive", param="grpo.clip_low")
        if self.beta < 0 or self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ConfigError("grpo.beta must be >= 0, grpo.temperature > 0 and grpo.top_p in (0, 1]", param="grpo.beta")
        if self.eval_every < 0:
            raise ConfigError(f"grpo.eval_every={self.eval_every} must be >= 0 (0: only before and after)", param="grpo.eval_every")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ConfigError(f"grpo.max_minutes={self.max_minutes} must be positive, or left out", param="grpo.max_minutes")
        _device("grpo", self.device)


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """Supervised fine-tuning on chats: loss on assistant tokens only, packed rows of ``seq_len``."""

    seq_len: int = 512
    packing: bool = True
    micro_batch_size: int = 4
    grad_accum: int = 1
    epochs: int = 1
    max_steps: int | None = None  # default: ``epochs`` passes over the data
    max_minutes: float | None = None
    lora_rank: int = 0  # 0: full fine-tuning
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    log_every: int = 10
    save_every: int = 100
    keep_last: int = 2
    seed: int = 0
    device: str = "auto"
    threads: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        _positive("sft", self, ("seq_len", "micro_batch_size", "grad_accum", "epochs", "log_every", "save_every", "keep_last"))
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"sft.max_steps={self.max_steps} must be positive, or left out", param="sft.max_steps")
        if self.lora_rank < 0 or self.lora_alpha <= 0 or not 0 <= self.lora_dropout < 1:
            raise ConfigError("sft.lora_rank must be >= 0, sft.lora_alpha > 0, sft.lora_dropout in [0, 1)", param="sft.lora_rank")
        _device("sft", self.device)


def load_sections(path: str | Path | None, sections: dict[str, type], overrides: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Each of ``sections`` (name -> dataclass) built from ``path``'s section of that name (or its
    defaults), with ``overrides[name]`` on top; a section the file has but ``sections`` lacks is an error."""
    raw = load_yaml(path) if path is not None else {}
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {unknown}; this run reads {sorted(sections)}")
    built = {}
    for name, cls in sections.items():
        values = dict(raw.get(name) or {})
        values.update({k: v for k, v in ((overrides or {}).get(name) or {}).items() if v is not None})
        built[name] = _build(cls, values, where=f"{path or 'defaults'} [{name}]")
    return built


GRPO_SECTIONS = {"task": TaskConfig, "grpo": GRPOConfig, "optim": OptimConfig}
SFT_SECTIONS = {"sft": SFTConfig, "optim": OptimConfig}
