"""The training loop: AdamW on the one model, accumulation, mixed precision, sparsity control,
out-of-memory recovery, validation, metrics and checkpoints that resume the same loss curve.

Each optimizer step draws its whole batch (``micro_batch_size × grad_accum × world`` blocks) from
the data stream first and only then splits it into micro-batches, so when an out-of-memory error
halves the micro-batch and doubles accumulation the step still sees exactly the same samples.
This module never decides the architecture or the data: it is given both.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import resource
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from r1kit.config import ModelConfig, dump_json
from r1kit.data.shards import ShardDataset
from r1kit.device import resolve_device
from r1kit.errors import CheckpointError, ConfigError
from r1kit.model.sparsity import SparsityController
from r1kit.model.transformer import R1kitForCausalLM
from r1kit.train import distributed
from r1kit.train.checkpoint import check_run_dir, resume_point, save_checkpoint
from r1kit.train.config import TrainConfig
from r1kit.train.schedule import lr_at

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only (``dim >= 2``); norms and biases are not decayed."""
    params = [p for p in model.parameters() if p.requires_grad]
    seen: set[int] = set()
    decay, no_decay = [], []
    for p in params:
        if id(p) in seen:  # tied embeddings appear once
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_adamw(model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], eps: float, fused: bool = True) -> torch.optim.AdamW:
    """AdamW over ``model``'s trainable parameters, decayed as :func:`decay_groups` says. ``fused``:
    one kernel per step instead of a chain of foreach ops (tensor-parallel DTensors need foreach)."""
    return torch.optim.AdamW(decay_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, fused=fused)


def rng_state(device: torch.device) -> dict[str, Any]:
    """The random state a resumed run must restore to draw what the uninterrupted run drew."""
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (nanoGPT's 6N + 12·L·H·D·T; attention counted over the full context)."""
    return 6 * config.num_parameters() + 12 * config.num_layers * config.num_heads * config.head_dim * seq_len


def measure_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, size: int = 1024, seconds: float = 0.5) -> float:
    """The matmul throughput this device reaches: the denominator of MFU (no vendor table needed).
    A property of the machine, so measured once per process for each device, dtype and thread count."""
    return _peak_flops(torch.device(device), dtype, size, seconds, torch.get_num_threads())


@functools.lru_cache(maxsize=None)
def _peak_flops(device: torch.device, dtype: torch.dtype, size: int, seconds: float, threads: int) -> float:
    gen = torch.Generator(device=device).manual_seed(0)  # never the global RNG: resuming must replay it exactly
    a = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    for _ in range(2):
        a @ b
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * n / (time.perf_counter() - start)


def unigram_perplexity(dataset: ShardDataset, max_tokens: int = 5_000_000) -> float:
    """Perplexity of the best context-free model (token frequencies of the split): the bar to clear."""
    counts = np.bincount(dataset.read(0, min(dataset.tokens, max_tokens)), minlength=dataset.vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@dataclasses.dataclass
class LoopState:
    step: int = 0
    tokens: int = 0
    elapsed: float = 0.0
    micro_batch_size: int = 0
    grad_accum: int = 0


class Trainer:
    """One training run. ``run()`` trains until ``max_steps`` or ``max_minutes`` and returns a summary."""

    def __init__(self, model_config: ModelConfig | None, config: TrainConfig, resume: bool = False, log: Callable[[str], None] = print) -> None:
        self.config, self.log = config, log
        self.out = Path(config.out)
        self.dist = distributed.setup(config.tensor_parallel, config.device, config.data_parallel)
        self.device = resolve_device(config.device, "train.device") if self.dist.world == 1 else self.dist.device
        if config.threads:
            torch.set_num_threads(config.threads)
        if config.precision == "fp16" and self.device.type != "cuda":
            raise ConfigError("train.precision=fp16 needs a CUDA device (its gradient scaler is CUDA-only); use bf16 or fp32 on CPU")
        self.data = ShardDataset(config.data, "train", config.seq_len, seed=config.seed)
        self.val = ShardDataset(config.data, "val", config.seq_len, shuffle=False)
        self.validate = self._check_data()
        check_run_dir(self.out)
        self.tokenizer_file = self._find_tokenizer()
        resumed = resume_point(self.out, log) if resume else None
        checkpoint = resumed[0] if resumed else None
        if resume and checkpoint is None:
            log(f"no checkpoint under {self.out / 'checkpoints'}: starting from step 0")
        torch.manual_seed(config.seed)
        self.model = self._build_model(model_config, checkpoint)
        if self.model.config.vocab_size < self.data.vocab_size:
            raise ConfigError(
                f"model vocab_size={self.model.config.vocab_size} is smaller than the data's {self.data.vocab_size}; "
                "set model.vocab_size to the tokenizer's size"
            )
        self.model.gradient_checkpointing = config.activation_checkpointing
        if config.fused_kernels:  # swapped in before any wrapping; where they cannot run, r1kit.fused logs why
            from r1kit.fused import apply_fused_kernels

            apply_fused_kernels(self.model, dtypes=(self.model.dtype, AUTOCAST[config.precision] or self.model.dtype))
        self.wrapped = distributed.wrap(self.model, self.dist)
        self.optimizer = build_adamw(self.model, config.lr, config.weight_decay, (config.beta1, config.beta2), config.eps, fused=self.dist.tp == 1)
        self.scaler = torch.amp.GradScaler("cuda", enabled=config.precision == "fp16")
        self.controller = SparsityController(self.model, config.sparsity_control) if self.model.topk_layers() and config.sparsity_control else None
        self.gate_means = watch_gates(self.model)
        self.state = LoopState(micro_batch_size=config.micro_batch_size, grad_accum=config.grad_accum)
        if resumed is not None:
            self._restore(*resumed)
        self.flops_per_token = flops_per_token(self.model.config, config.seq_len)
        dtype = AUTOCAST[config.precision] or torch.float32
        self.peak_flops = measure_peak_flops(self.device, dtype)
        self.metrics_file = self.out / "metrics.jsonl"
        self.tb = None

    # -- set-up ---------------------------------------------------------------------------------
    def _check_data(self) -> bool:
        """Fail before anything is written when the train split cannot fill one block; returns whether to validate.

        An empty val split is an error while validation is asked for (``eval_every`` > 0); with
        ``eval_every: 0`` it turns validation off, saying so, and the summary's val loss is null.
        """
        block = self.config.seq_len + 1
        if len(self.data) == 0:
            raise ConfigError(
                f"the train split of {self.config.data} has {self.data.tokens} tokens, fewer than one block of "
                f"seq_len + 1 = {block}: prepare more data, or lower train.seq_len"
            )
        if len(self.val):
            return True
        problem = f"the val split of {self.config.data} has {self.val.tokens} tokens, fewer than one block of seq_len + 1 = {block}"
        if self.config.eval_every:
            raise ConfigError(
                f"{problem}, so there is nothing to validate on: re-run `r1kit prepare` with a larger --val-fraction "
                f"(it was {self.data.index.get('val_fraction', 'not recorded')}), lower train.seq_len, "
                "or set train.eval_every to 0 to train without validation"
            )
        self.log(f"{problem}: training without validation (train.eval_every is 0)")
        return False

    def _find_tokenizer(self) -> Path | None:
        rel = self.data.index.get("tokenizer")
        if not rel:
            return None
        file = (Path(self.config.data) / rel).resolve()
        if not file.is_file():
            # without it the exported model could not be used by generate or serve
            raise ConfigError(
                f"{self.data.directory / 'index.json'} names the tokenizer {rel!r} ({file}), which is missing: "
                "put back the tokenizer.json that `r1kit prepare` wrote there, or re-run prepare"
            )
        return file

    def _build_model(self, model_config: ModelConfig | None, checkpoint: Path | None) -> R1kitForCausalLM:
        from r1kit.checkpoints import load_model

        source = checkpoint or (Path(self.config.init_from) if self.config.init_from else None)
        if source is not None:
            model = load_model(source, dtype=torch.float32, device=self.device)
        else:
            model = R1kitForCausalLM(model_config).to(self.device)
        return model.train()

    def _restore(self, checkpoint: Path, state: dict[str, Any]) -> None:
        self._restore_optimizer(checkpoint)
        self.scaler.load_state_dict(state["scaler"])
        self.data.load_state_dict(state["data"])
        self.state = LoopState(**state["loop"])
        self._split_batch(state.get("data_parallel", self.dist.dp_world))
        if self.controller is not None and state.get("controller"):
            self.controller.load_state_dict(state["controller"])
        restore_rng(state["rng"], self.device)
        if self.dist.is_main:
            truncate_metrics(self.out / "metrics.jsonl", self.state.step)
        self.log(f"resumed from {checkpoint} at step {self.state.step}")

    def _restore_optimizer(self, checkpoint: Path) -> None:
        # imported here: torch.distributed.checkpoint takes seconds to import, and only checkpoints need it
        from r1kit.train import optimizer_state

        folder = checkpoint / optimizer_state.FOLDER
        if not folder.is_dir():
            raise CheckpointError(
                f"{checkpoint} has no {optimizer_state.FOLDER}/ folder: an older r1kit wrote it, before checkpoints resumed on "
                f"any number of processes. Resume it with that r1kit, or start a new run from its weights (train.init_from: {checkpoint})"
            )
        optimizer_state.load_optimizer(self.model, self.optimizer, folder)

    def _split_batch(self, saved_dp: int) -> None:
        """Keep each step's batch when the run resumes on a different number of data-parallel ranks:
        the checkpoint's ranks each took ``micro_batch_size × grad_accum`` sequences; each rank now takes
        its share, in micro-batches of at most ``train.micro_batch_size``."""
        if saved_dp == self.dist.dp_world:
            return
        batch = self.state.micro_batch_size * self.state.grad_accum * saved_dp
        if batch % self.dist.dp_world:
            raise ConfigError(
                f"the checkpoint's steps take {batch} sequences, which {self.dist.dp_world} data-parallel ranks cannot share "
                f"equally: resume on a number of processes whose data-parallel part divides {batch}"
            )
        share = batch // self.dist.dp_world
        self.state.micro_batch_size = max(d for d in range(1, min(share, self.config.micro_batch_size) + 1) if share % d == 0)
        self.state.grad_accum = share // self.state.micro_batch_size
        self.log(
            f"resuming {saved_dp} data-parallel rank(s) on {self.dist.dp_world}: each takes {share} of the step's {batch} "
            f"sequences, micro-batch {self.state.micro_batch_size} x accumulation {self.state.grad_accum}"
        )

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg = self.config
        self.out.mkdir(parents=True, exist_ok=True)
        if self.dist.is_main:
            dump_json({"train": _jsonable(dataclasses.asdict(cfg)), "model": self.model.config.to_dict()}, self.out / "run_config.json")
            self.tb = open_tensorboard(self.out / "tensorboard")
        baseline = unigram_perplexity(self.data)
        self.log(
            f"model {self.model.config.num_parameters() / 1e6:.2f}M params | {self.data.tokens:,} train tokens | "
            f"{self._step_tokens():,} tokens/step | unigram-baseline perplexity {baseline:.1f}"
        )
        bar = progress_bar(self.state.step, cfg.max_steps, self.dist.is_main)
        start = time.perf_counter() - self.state.elapsed
        window_start, window_tokens = time.perf_counter(), 0
        last_val: dict[str, float] = {}
        stop_reason = "max_steps"
        while self.state.step < cfg.max_steps:
            if cfg.max_minutes is not None and (time.perf_counter() - start) / 60 >= cfg.max_minutes:
                stop_reason = "max_minutes"
                break
            lr = lr_at(self.state.step, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss, grad_norm = self._train_step()
            sparsity = self.controller.step(loss) if self.controller else {}
            self.state.step += 1
            self.state.tokens += self._step_tokens()
            window_tokens += self._step_tokens()
            self.state.elapsed = time.perf_counter() - start
            if cfg.eval_every and self.state.step % cfg.eval_every == 0:
                last_val = self.evaluate()
            if self.state.step % cfg.log_every == 0 or self.state.step == cfg.max_steps or last_val.get("step") == self.state.step:
                now = time.perf_counter()
                tps = window_tokens / max(now - window_start, 1e-9)
                window_start, window_tokens = now, 0
                record = {
                    "step": self.state.step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": self.state.tokens,
                    "tokens_per_s": tps, "mfu": tps * self.flops_per_token / self.peak_flops / self.dist.world,
                    "peak_mem_mb": peak_memory_mb(self.device), "elapsed_s": self.state.elapsed,
                    "micro_batch_size": self.state.micro_batch_size, "grad_accum": self.state.grad_accum,
                    **({"sparsity": {str(k): round(v, 4) for k, v in sparsity.items()}} if sparsity else {}),
                    **({"gate": gates} if (gates := self._gate_means()) else {}),
                    **({k: v for k, v in last_val.items() if k != "step"} if last_val.get("step") == self.state.step else {}),
                }  # fmt: skip
                self._write_metrics(record)
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}", mfu=f"{record['mfu']:.1%}", mem=f"{record['peak_mem_mb']:.0f}MB", refresh=False)
            bar.update(1)
            if self.state.step % cfg.save_every == 0:
                self.save()
        bar.close()
        final_val = self.evaluate()
        self.save()
        model_dir = self.export()
        summary = {
            "steps": self.state.step, "tokens": self.state.tokens, "elapsed_s": self.state.elapsed, "stop": stop_reason,
            "val_loss": final_val["val_loss"], "val_ppl": final_val["val_ppl"], "unigram_ppl": baseline, "model": str(model_dir),
        }  # fmt: skip
        if self.dist.is_main:
            dump_json(summary, self.out / "summary.json")
        val = f"val loss {final_val['val_loss']:.4f}, val perplexity {final_val['val_ppl']:.2f}" if self.validate else "no validation"
        self.log(f"done: {self.state.step} steps, {val} (unigram baseline {baseline:.1f}) -> {model_dir}")
        if self.tb is not None:
            self.tb.close()
        return summary

    def _step_tokens(self) -> int:
        """Tokens of one optimizer step on all data-parallel ranks (the loop's batch: a resumed run may split it anew)."""
        return self.state.micro_batch_size * self.state.grad_accum * self.config.seq_len * self.dist.dp_world

    def _train_step(self) -> tuple[float, float]:
        """One optimizer step over the step's full batch; on OOM retry with half the micro-batch."""
        total = self.state.micro_batch_size * self.state.grad_accum
        inputs, targets = self.data.next_batch(total * self.dist.dp_world)
        lo = self.dist.dp_rank * total
        inputs = torch.from_numpy(inputs[lo : lo + total]).to(self.device)
        targets = torch.from_numpy(targets[lo : lo + total]).to(self.device)
        while True:
            try:
                return self._accumulate(inputs, targets)
            except torch.OutOfMemoryError:
                if self.state.micro_batch_size == 1:
                    raise
                self.optimizer.zero_grad(set_to_none=True)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                # the largest micro-batch up to half the current one that divides the step's batch exactly
                self.state.micro_batch_size = max(d for d in range(1, self.state.micro_batch_size // 2 + 1) if total % d == 0)
                self.state.grad_accum = total // self.state.micro_batch_size
                self.log(
                    f"out of memory at step {self.state.step}: micro-batch -> {self.state.micro_batch_size}, "
                    f"accumulation -> {self.state.grad_accum} (effective batch {total} unchanged)"
                )

    def _accumulate(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
        cfg = self.config
        mb, accum = self.state.micro_batch_size, self.state.grad_accum
        self.optimizer.zero_grad(set_to_none=True)
        dtype = AUTOCAST[cfg.precision]
        autocast = torch.autocast(self.device.type, dtype=dtype) if dtype else nullcontext()
        total_loss = torch.zeros((), device=self.device)
        for i in range(accum):
            x, y = inputs[i * mb : (i + 1) * mb], targets[i * mb : (i + 1) * mb]
            sync = i == accum - 1
            with distributed.maybe_no_sync(self.wrapped, sync), autocast:
                logits = self.wrapped(x)
                loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten()) / accum
            self.scaler.scale(loss).backward()
            total_loss += loss.detach()
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = distributed.clip_grad_norm(params, cfg.grad_clip, self.dist)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return distributed.mean(total_loss, self.dist), float(grad_norm)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float | None]:
        """Mean loss and perplexity over the first ``eval_batches`` blocks of the validation split
        (None for both when validation is off: JSON null, never NaN)."""
        if not self.validate:
            return {"step": self.state.step, "val_loss": None, "val_ppl": None}
        self.model.eval()
        n = min(len(self.val), self.config.eval_batches * self.config.micro_batch_size)
        total_loss, total_tokens = 0.0, 0
        dtype = AUTOCAST[self.config.precision]
        for lo in range(0, n, self.config.micro_batch_size):
            pairs = [self.val[i] for i in range(lo, min(n, lo + self.config.micro_batch_size))]
            x = torch.from_numpy(np.stack([p[0] for p in pairs])).to(self.device)
            y = torch.from_numpy(np.stack([p[1] for p in pairs])).to(self.device)
            with torch.autocast(self.device.type, dtype=dtype) if dtype else nullcontext():
                logits = self.model(x)
            total_loss += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
            total_tokens += y.numel()
        self.model.train()
        val_loss = total_loss / total_tokens  # _check_data made sure there is at least one block
        return {"step": self.state.step, "val_loss": val_loss, "val_ppl": math.exp(val_loss)}

    # -- outputs --------------------------------------------------------------------------------
    def save(self) -> None:
        """Checkpoint the run on every rank: the model (gathered where it is sharded) and the loop's
        state from rank 0, the optimizer's shards from each rank (torch.distributed.checkpoint)."""
        from r1kit.train import optimizer_state

        full = distributed.full_state_dict(self.model) if self.dist.sharded else None  # a collective: every rank
        state = {
            "scaler": self.scaler.state_dict(),
            "data": self.data.state_dict(),
            "loop": dataclasses.asdict(self.state),
            "data_parallel": self.dist.dp_world,  # the loop's micro-batch is per data-parallel rank
            "controller": self.controller.state_dict() if self.controller else None,
            "rng": rng_state(self.device),
        }
        extra = [self.tokenizer_file] if self.tokenizer_file else []
        save_checkpoint(
            self.out, self.state.step, self.model, state, self.config.keep_last, extra, model_state=full, rank=self.dist.rank,
            barrier=lambda: distributed.barrier(self.dist),
            write_shards=lambda tmp: optimizer_state.save_optimizer(self.model, self.optimizer, tmp / optimizer_state.FOLDER),
        )  # fmt: skip

    def export(self) -> Path:
        """The final model as a plain model directory (``<out>/model``), ready for generate/serve."""
        final = self.out / "model"
        full = distributed.full_state_dict(self.model) if self.dist.sharded else None
        if self.dist.is_main:
            tmp = self.out / ".model.tmp"
            self.model.save_pretrained(tmp, state=full)
            if self.tokenizer_file:
                (tmp / "tokenizer.json").write_bytes(self.tokenizer_file.read_bytes())
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
        distributed.barrier(self.dist)
        return final

    def _gate_means(self) -> dict[str, float]:
        """Mean local-branch weight of each hybrid layer in the last training forward (1 = all local)."""
        return {str(i): round(float(mean), 4) for i, mean in sorted(self.gate_means.items())}

    def _write_metrics(self, record: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        append_metrics(self.metrics_file, self.tb, record)
        if self.tb is not None:
            for group in ("sparsity", "gate"):
                for layer, value in record.get(group, {}).items():
                    self.tb.add_scalar(f"{group}/layer{layer}", value, record["step"])


def watch_gates(model: R1kitForCausalLM) -> dict[int, torch.Tensor]:
    """A dict that forward hooks on each hybrid layer's gate network fill, by layer, with the mean
    local-branch weight (sigmoid of the gate) of its latest training forward. Kept as tensors: no
    device sync on every forward, only when the metrics are written."""
    means: dict[int, torch.Tensor] = {}
    for i, layer in enumerate(model.model.layers):
        if layer.self_attn.kind == "hybrid":
            layer.self_attn.gate.register_forward_hook(functools.partial(_record_gate_mean, means, i))
    return means


def _record_gate_mean(means: dict[int, torch.Tensor], layer: int, module, args, out: torch.Tensor) -> None:
    if module.training:
        means[layer] = torch.sigmoid(out.detach()).float().mean()


def append_metrics(file: Path, tb, record: dict[str, Any], section: str = "train") -> None:
    """Append ``record`` (it has a ``step``) to the run's metrics JSONL and its numbers to TensorBoard (``tb``, or None)."""
    with open(file, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    if tb is not None:
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                tb.add_scalar(f"{section}/{key}", value, record["step"])


def truncate_metrics(file: Path, step: int) -> None:
    """Drop the metrics of steps after ``step`` (a resumed run writes them again), atomically."""
    if not file.is_file():
        return
    keep = [line for line in file.read_text().splitlines() if _metrics_step(line) <= step]
    tmp = file.with_name(f".{file.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(file)


def _metrics_step(line: str) -> float:
    """The step of a metrics line; infinity for a torn line (a run killed mid-write, a full disk), which is dropped."""
    try:
        return json.loads(line).get("step", 0)
    except ValueError:
        return math.inf


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d, default=str))


def open_tensorboard(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency, but a trimmed install still trains
        return None
    return SummaryWriter(str(path))


def progress_bar(initial: int, total: int, enabled: bool, desc: str = "train"):
    """A tqdm bar over steps; off on ranks other than the main one and under ``R1KIT_NO_PROGRESS=1``."""
    from tqdm import tqdm

    import sys

    # a log file (CI, nohup) gets a line every 30 s, not one per step
    interval = 0.5 if sys.stderr.isatty() else 30.0
    return tqdm(total=total, initial=initial, desc=desc, unit="step", mininterval=interval,
                disable=not enabled or os.environ.get("R1KIT_NO_PROGRESS") == "1", dynamic_ncols=True)  # fmt: skip
