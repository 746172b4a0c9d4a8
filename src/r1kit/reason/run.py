"""What SFT and GRPO runs share, built from the trainer's parts: the policy loaded from a model
directory (optionally with LoRA adapters through ``peft``), AdamW with the trainer's decay groups and
schedule, DDP under torchrun, checkpoints with manifests that resume exactly, metrics in JSONL and
TensorBoard, and the final model directory (LoRA merged into the weights on every save).

A checkpoint's model is always a plain model directory (what every other verb reads). A LoRA run
also keeps its adapters in the trainer state and, on resume, rebuilds them over the original model,
so the resumed run continues the same curve. This module never decides what the loss is.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from r1kit.checkpoints import load_model, resolve_model
from r1kit.config import dump_json
from r1kit.device import resolve_device
from r1kit.errors import ConfigError
from r1kit.reason.config import OptimConfig
from r1kit.train import distributed
from r1kit.train.checkpoint import check_run_dir, resume_point, save_checkpoint
from r1kit.train.schedule import lr_at
from r1kit.train.trainer import (
    AUTOCAST,
    append_metrics,
    build_adamw,
    open_tensorboard,
    restore_rng,
    rng_state,
    truncate_metrics,
)

# the files of a model directory that describe its tokenizer and chat format: carried into every save
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "generation_config.json")


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]


class PolicyRun:
    """The trainable policy of a run under ``out`` and everything around it but the loss.

    ``model``: a model directory, ``.gguf`` or pulled name; ``resume``: continue from the newest
    intact checkpoint under ``out`` (its state is in :attr:`resumed_state`, its step in :attr:`step`)."""

    def __init__(self, model: str | Path, out: str | Path, optim: OptimConfig, *, device: str = "auto", threads: int | None = None,
                 seed: int = 0, keep_last: int = 2, lora: LoraSettings | None = None, resume: bool = False,
                 log: Callable[[str], None] = print) -> None:  # fmt: skip
        self.out, self.optim, self.keep_last, self.lora, self.log = Path(out), optim, keep_last, lora, log
        self.dist = distributed.setup(1, device)
        self.device = resolve_device(device, "device") if self.dist.world == 1 else self.dist.device
        if threads:
            torch.set_num_threads(threads)
        check_run_dir(self.out)
        self.model_dir = resolve_model(model)
        resumed = resume_point(self.out, log) if resume else None
        if resume and resumed is None:
            log(f"no checkpoint under {self.out / 'checkpoints'}: starting from step 0")
        torch.manual_seed(seed)
        # a LoRA run resumes from the original weights plus its saved adapters; a full one from the checkpoint
        source = resumed[0] if resumed is not None and lora is None else self.model_dir
        self.base = load_model(source, dtype=torch.float32, device=self.device).train()
        self.model = self._with_lora(self.base) if lora else self.base
        self.wrapped = distributed.wrap(self.model, self.dist)
        self.optimizer = build_adamw(self.model, optim.lr, optim.weight_decay, (optim.beta1, optim.beta2), optim.eps, fused=True)
        self.step = 0
        self.resumed_state: dict[str, Any] | None = None
        self.metrics_file = self.out / "metrics.jsonl"
        if resumed is not None:
            self._restore(*resumed)
        self.tb = None

    def _with_lora(self, model):
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise ConfigError("LoRA needs the peft package: pip install peft (or train all weights: lora rank 0)") from None
        for p in model.parameters():
            p.requires_grad_(False)
        config = LoraConfig(r=self.lora.rank, lora_alpha=self.lora.alpha, lora_dropout=self.lora.dropout, target_modules=list(self.lora.targets))
        return get_peft_model(model, config)

    def _restore(self, checkpoint: Path, state: dict[str, Any]) -> None:
        if self.lora is not None:
            self.model.load_state_dict(state["adapters"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        restore_rng(state["rng"], self.device)
        self.step = int(state["loop"]["step"])
        self.resumed_state = state
        if self.dist.is_main:
            truncate_metrics(self.metrics_file, self.step)
        self.log(f"resumed from {checkpoint} at step {self.step}")

    # -- the loop's pieces ------------------------------------------------------------------------
    def start(self, run_config: dict[str, Any]) -> None:
        """Write the run's configuration and open TensorBoard (main rank)."""
        self.out.mkdir(parents=True, exist_ok=True)
        if self.dist.is_main:
            dump_json({**run_config, "model": str(self.model_dir)}, self.out / "run_config.json")
            self.tb = open_tensorboard(self.out / "tensorboard")

    def autocast(self):
        dtype = AUTOCAST[self.optim.precision]
        return torch.autocast(self.device.type, dtype=dtype) if dtype else torch.autocast(self.device.type, enabled=False)

    def set_lr(self, total_steps: int) -> float:
        """The schedule's learning rate for the coming step, set on every parameter group."""
        lr = lr_at(self.step, self.optim.lr, self.optim.min_lr, self.optim.warmup_steps, total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def optimizer_step(self) -> float:
        """Clip the (all-reduced) gradients, step, zero them; returns the gradient norm before clipping."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        norm = distributed.clip_grad_norm(params, self.optim.grad_clip, self.dist)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def write_metrics(self, record: dict[str, Any], section: str) -> None:
        if self.dist.is_main:
            append_metrics(self.metrics_file, self.tb, record, section)

    # -- outputs ----------------------------------------------------------------------------------
    def plain_model(self):
        """The policy as a plain ``R1kitForCausalLM``: LoRA merged into a copy, else the model itself."""
        if self.lora is None:
            return self.base
        return copy.deepcopy(self.model).merge_and_unload()

    def save(self, extra_state: dict[str, Any]) -> None:
        """Checkpoint ``step-N`` (model directory + optimizer, RNG, loop and ``extra_state``)."""
        if not self.dist.is_main:
            return
        state = {"optimizer": self.optimizer.state_dict(), "rng": rng_state(self.device), "loop": {"step": self.step}, **extra_state}
        if self.lora is not None:
            state["adapters"] = {k: v.detach().cpu() for k, v in self.model.state_dict().items() if "lora_" in k}
        save_checkpoint(self.out, self.step, self.plain_model(), state, self.keep_last, self._tokenizer_files())

    def export(self) -> Path:
        """The final policy as ``<out>/model`` (LoRA merged), with the source's tokenizer files."""
        final = self.out / "model"
        if self.dist.is_main:
            tmp = self.out / ".model.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            self.plain_model().save_pretrained(tmp)
            for file in self._tokenizer_files():
                shutil.copyfile(file, tmp / file.name)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
        distributed.barrier(self.dist)
        return final

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()

    def _tokenizer_files(self) -> list[Path]:
        return [self.model_dir / name for name in TOKENIZER_FILES if (self.model_dir / name).is_file()]
