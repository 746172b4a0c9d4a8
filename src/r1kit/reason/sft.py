"""Supervised fine-tuning on chats: the loss on assistant tokens only, over packed rows whose
documents never see each other, with full fine-tuning or LoRA (merged into every saved model).

The rows of step ``s`` are a pure function of (seed, s): epoch ``e`` visits the rows in a
permutation seeded by ``seed + e``, so a resumed run needs no data position to continue the same
curve. Under torchrun each rank takes its slice of the step's rows; the loss is the mean over the
step's assistant tokens on all ranks (each rank divides by the global count, DDP averages).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from r1kit.chat_template import ChatTemplate
from r1kit.config import dump_json
from r1kit.errors import ConfigError
from r1kit.reason.config import OptimConfig, SFTConfig
from r1kit.reason.document_attention import DocumentAttention
from r1kit.reason.run import LoraSettings, PolicyRun
from r1kit.reason.sft_data import IGNORE, Rows, build_documents, pack, read_chats
from r1kit.tokenizer import load_tokenizer
from r1kit.train import distributed
from r1kit.train.trainer import progress_bar


def packed_forward(model, rows: Rows, window: int) -> torch.Tensor:
    """Logits [B, T, V] of packed rows: per-document positions, block-diagonal causal attention."""
    return model(rows.inputs, cache=DocumentAttention(rows.documents, rows.positions, window))


class SFTTrainer:
    """One SFT run over ``data`` (JSONL chats). ``train()`` returns a summary."""

    def __init__(self, model: str | Path, data: str | Path, config: SFTConfig, optim: OptimConfig, out: str | Path,
                 resume: bool = False, log: Callable[[str], None] = print) -> None:  # fmt: skip
        self.config, self.data, self.log = config, str(data), log
        lora = LoraSettings(config.lora_rank, config.lora_alpha, config.lora_dropout, config.lora_targets) if config.lora_rank else None
        self.run = PolicyRun(model, out, optim, device=config.device, threads=config.threads, seed=config.seed,
                             keep_last=config.keep_last, lora=lora, resume=resume, log=log)  # fmt: skip
        tokenizer = load_tokenizer(self.run.model_dir)
        template = ChatTemplate.from_model_dir(self.run.model_dir)
        max_len = self.run.base.config.max_seq_len
        if config.seq_len > max_len:
            raise ConfigError(f"sft.seq_len={config.seq_len} exceeds the model's max_seq_len={max_len}", param="sft.seq_len")
        documents, dropped = build_documents(read_chats(data), template, tokenizer, config.seq_len)
        if not documents:
            raise ConfigError(f"no chat of {data} keeps an assistant token within sft.seq_len={config.seq_len}: raise it", param="sft.seq_len")
        if dropped:
            log(f"{dropped} chat(s) dropped: cut to sft.seq_len={config.seq_len} tokens they kept no assistant token")
        self.rows = pack(documents, config.seq_len, config.packing)
        self.window = self.run.base.config.window_for(config.seq_len)
        self.rows_per_step = config.micro_batch_size * config.grad_accum * self.run.dist.world
        self.steps_per_epoch = math.ceil(len(self.rows) / self.rows_per_step)
        self.total_steps = config.max_steps or config.epochs * self.steps_per_epoch
        self.elapsed = float((self.run.resumed_state or {}).get("elapsed", 0.0))
        log(f"{len(documents)} chats in {len(self.rows)} rows of {config.seq_len} tokens; {self.total_steps} steps")

    def step_rows(self, step: int) -> Rows:
        """This rank's rows of optimizer step ``step`` (the epoch's seeded permutation, wrapped at its end)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        order = torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(self.config.seed + epoch))
        picks = [order[(k * self.rows_per_step + i) % len(self.rows)] for i in range(self.rows_per_step)]
        local = self.rows_per_step // self.run.dist.world
        mine = torch.stack(picks[self.run.dist.rank * local : (self.run.dist.rank + 1) * local])
        return self.rows.select(mine)

    def train(self) -> dict[str, Any]:
        c, run = self.config, self.run
        run.start({"sft": dataclasses.asdict(c), "optim": dataclasses.asdict(run.optim), "data": self.data})
        bar = progress_bar(run.step, self.total_steps, run.dist.is_main, desc="sft")
        start = time.perf_counter() - self.elapsed
        stop, loss = "max_steps", float("nan")
        while run.step < self.total_steps:
            if c.max_minutes is not None and (time.perf_counter() - start) / 60 >= c.max_minutes:
                stop = "max_minutes"
                break
            lr = run.set_lr(self.total_steps)
            t0 = time.perf_counter()
            loss, tokens = self._step(self.step_rows(run.step))
            grad_norm = run.optimizer_step()
            run.step += 1
            self.elapsed = time.perf_counter() - start
            if run.step % c.log_every == 0 or run.step == self.total_steps:
                run.write_metrics({"step": run.step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "loss_tokens": tokens,
                                   "tokens_per_s": self.rows_per_step * c.seq_len / max(time.perf_counter() - t0, 1e-9),
                                   "elapsed_s": self.elapsed}, "sft")  # fmt: skip
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
            bar.update(1)
            if run.step % c.save_every == 0:
                run.save({"elapsed": self.elapsed})
        bar.close()
        run.save({"elapsed": self.elapsed})
        model_dir = run.export()
        summary = {"steps": run.step, "loss": loss, "elapsed_s": self.elapsed, "stop": stop, "model": str(model_dir),
                   "rows": len(self.rows), "lora_rank": c.lora_rank}  # fmt: skip
        if run.dist.is_main:
            dump_json(summary, run.out / "summary.json")
        run.close()
        self.log(f"done: {run.step} steps, loss {loss:.4f} -> {model_dir}")
        return summary

    def _step(self, rows: Rows) -> tuple[float, int]:
        """Forward and backward over the step's rows in micro-batches; (mean loss per assistant token, tokens)."""
        c, run = self.config, self.run
        rows = Rows(*(t.to(run.device) for t in (rows.inputs, rows.targets, rows.positions, rows.documents)))
        counted = torch.tensor([float((rows.targets != IGNORE).sum())], dtype=torch.float64)
        total = distributed.mean(counted, run.dist) * run.dist.world  # the step's assistant tokens on all ranks
        total_loss = torch.zeros((), device=run.device)
        mb = c.micro_batch_size
        for i in range(c.grad_accum):
            part = rows.select(slice(i * mb, (i + 1) * mb))
            with distributed.maybe_no_sync(run.wrapped, i == c.grad_accum - 1), run.autocast():
                logits = packed_forward(run.wrapped, part, self.window)
            # summed, then divided by the global count (times world: DDP averages the ranks' gradients)
            loss = F.cross_entropy(logits.float().flatten(0, 1), part.targets.flatten(), ignore_index=IGNORE, reduction="sum")
            (loss * run.dist.world / max(total, 1.0)).backward()
            total_loss += loss.detach()
        return distributed.mean(total_loss, run.dist) * run.dist.world / max(total, 1.0), int(total)
