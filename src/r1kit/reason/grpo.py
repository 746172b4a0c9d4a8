"""The GRPO loop: rollouts on the engine, rewards from verifiers, group-normalised advantages, then
``mu`` optimizer steps over the batch; held-out evaluation, metrics, checkpoints and exact resume.

Each step: the step's prompts (problem ``step·P + i`` of the task, split over the ranks under
torchrun) are sampled ``group_size`` times each on the engine, which holds the policy's current
weights (:meth:`~r1kit.infer.engine.LLMEngine.update_weights` after every optimizer step). The
completions are scored, their advantages computed within each group (a group never spans ranks),
and the policy takes ``mu`` AdamW steps on the clipped objective (:mod:`r1kit.reason.grpo_loss`),
accumulating over micro-batches; DDP all-reduces the gradients, and every loss is divided by the
batch's totals over all ranks, so the gradient is the whole batch's. Each problem's completions are
sampled with a seed of (seed, step, problem), whichever rank draws them: an interrupted run resumed
from a checkpoint repeats the uninterrupted one, and N processes sample what one process samples.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from r1kit.chat_template import ChatTemplate
from r1kit.checkpoints import load_model
from r1kit.config import dump_json
from r1kit.errors import ConfigError
from r1kit.infer.engine import EngineConfig
from r1kit.infer.sampling import SamplingParams
from r1kit.reason.config import GRPOConfig, OptimConfig
from r1kit.reason.grpo_loss import (
    group_advantages,
    grpo_loss,
    token_entropy,
    token_logprobs,
)
from r1kit.reason.rollout import Rollout, RolloutEngine
from r1kit.reason.run import PolicyRun
from r1kit.reason.tasks import Problem, Task, TaskConfig
from r1kit.tokenizer import load_tokenizer
from r1kit.train import distributed
from r1kit.train.trainer import progress_bar


@dataclasses.dataclass
class Batch:
    """A step's rollouts as tensors: ``inputs``/``targets`` [N, T] (targets are the next tokens),
    ``mask`` [N, T] true where the target is a completion token, ``advantages`` [N]."""

    inputs: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
    advantages: torch.Tensor
    engine_logprobs: torch.Tensor  # [N, T], the engine's log π_old at the masked places


def rollout_batch(rollouts: list[Rollout], advantages: torch.Tensor, device: torch.device) -> Batch:
    """Prompt + completion of each rollout, right-padded (causal attention: padding after a sequence
    never reaches it)."""
    width = max(len(r.prompt_ids) + len(r.completion_ids) - 1 for r in rollouts)
    n = len(rollouts)
    inputs = torch.zeros(n, width, dtype=torch.long)
    targets = torch.zeros(n, width, dtype=torch.long)
    mask = torch.zeros(n, width, dtype=torch.bool)
    engine = torch.zeros(n, width)
    for i, r in enumerate(rollouts):
        tokens = r.prompt_ids + r.completion_ids
        inputs[i, : len(tokens) - 1] = torch.tensor(tokens[:-1])
        targets[i, : len(tokens) - 1] = torch.tensor(tokens[1:])
        first = len(r.prompt_ids) - 1  # the input position that predicts the first completion token
        mask[i, first : len(tokens) - 1] = True
        engine[i, first : len(tokens) - 1] = torch.tensor(r.logprobs)
    return Batch(inputs.to(device), targets.to(device), mask.to(device), advantages.to(device), engine.to(device))


class GRPOTrainer:
    """One GRPO run. ``run()`` trains until ``grpo.max_steps`` or ``grpo.max_minutes`` and returns a summary."""

    def __init__(self, model: str | Path, task: TaskConfig, config: GRPOConfig, optim: OptimConfig, out: str | Path,
                 resume: bool = False, log: Callable[[str], None] = print) -> None:  # fmt: skip
        self.config, self.task_config, self.log = config, task, log
        self.run = PolicyRun(model, out, optim, device=config.device, threads=config.threads, seed=config.seed,
                             keep_last=config.keep_last, resume=resume, log=log)  # fmt: skip
        world = self.run.dist.world
        if config.prompts_per_step % world:
            raise ConfigError(f"grpo.prompts_per_step={config.prompts_per_step} must divide among the {world} processes", param="grpo.prompts_per_step")
        self.local_prompts = config.prompts_per_step // world
        self.task = Task(task)
        self.tokenizer = load_tokenizer(self.run.model_dir)
        self.template = ChatTemplate.from_model_dir(self.run.model_dir)
        self.reference = None
        if config.beta > 0:  # the frozen reference is the starting model, also after a resume
            self.reference = load_model(self.run.model_dir, dtype=torch.float32, device=self.run.device).eval().requires_grad_(False)
        max_len = min(self.run.base.config.max_seq_len, config.max_prompt_tokens + config.max_new_tokens)
        seqs = self.local_prompts * config.group_size
        block = EngineConfig.block_size  # a pool that holds every completion of a step at full length
        self.rollouts = RolloutEngine(self.run.base, self.tokenizer, max_model_len=max_len, max_num_seqs=seqs,
                                      num_kv_blocks=seqs * -(-max_len // block) + 1)  # fmt: skip
        state = self.run.resumed_state or {}
        self.elapsed = float(state.get("elapsed", 0.0))

    # -- prompts ----------------------------------------------------------------------------------
    def prompt_text(self, problem: Problem) -> str:
        text = self.template.render(self.task.messages(problem), add_generation_prompt=True)
        return text + "<think>\n" if self.config.think_prefix else text

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if len(ids) > self.config.max_prompt_tokens:
            raise ConfigError(f"a prompt has {len(ids)} tokens, more than grpo.max_prompt_tokens={self.config.max_prompt_tokens}: raise it", param="grpo.max_prompt_tokens")
        return ids

    def _params(self, greedy: bool) -> SamplingParams:
        c = self.config
        return SamplingParams(temperature=0.0 if greedy else c.temperature, top_p=1.0 if greedy else c.top_p, max_tokens=c.max_new_tokens)

    # -- the loop ---------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        c, run = self.config, self.run
        run.start({"task": dataclasses.asdict(self.task_config), "grpo": dataclasses.asdict(c), "optim": dataclasses.asdict(run.optim)})
        evaluated: tuple[int, dict[str, float]] | None = None  # (step, result) of the latest held-out evaluation
        if run.step == 0:
            evaluated = (0, self.evaluate())
            run.write_metrics({"step": 0, **evaluated[1]}, "eval")
        bar = progress_bar(run.step, c.max_steps, run.dist.is_main, desc="grpo")
        start = time.perf_counter() - self.elapsed
        stop = "max_steps"
        while run.step < c.max_steps:
            if c.max_minutes is not None and (time.perf_counter() - start) / 60 >= c.max_minutes:
                stop = "max_minutes"
                break
            record = self.step()
            self.elapsed = time.perf_counter() - start
            record["elapsed_s"] = self.elapsed
            if c.eval_every and run.step % c.eval_every == 0 and run.step < c.max_steps:
                evaluated = (run.step, self.evaluate())
                record.update(evaluated[1])
            if run.step % c.log_every == 0 or "heldout_reward" in record:
                run.write_metrics(record, "grpo")
            bar.set_postfix(reward=f"{record['reward_mean']:.3f}", acc=f"{record['accuracy']:.2f}", len=f"{record['completion_length']:.0f}", refresh=False)
            bar.update(1)
            if run.step % c.save_every == 0:
                run.save({"elapsed": self.elapsed})
        bar.close()
        if evaluated is not None and evaluated[0] == run.step:  # a time limit stopped the run right after an evaluation
            final = evaluated[1]
        else:
            final = self.evaluate()
            run.write_metrics({"step": run.step, **final}, "eval")
        run.save({"elapsed": self.elapsed})
        model_dir = run.export()
        summary = {"steps": run.step, "elapsed_s": self.elapsed, "stop": stop, "model": str(model_dir), **final}
        if run.dist.is_main:
            from r1kit.reason.report import write_report

            first = _first_eval(run.metrics_file)
            summary.update({"heldout_reward_before": first.get("heldout_reward"), "heldout_accuracy_before": first.get("heldout_accuracy")})
            dump_json(summary, run.out / "summary.json")
            summary["report"] = str(write_report(run.out))
            self.log(f"done: {run.step} steps; held-out reward {summary['heldout_reward_before']:.3f} -> {final['heldout_reward']:.3f}, "
                     f"accuracy {summary['heldout_accuracy_before']:.3f} -> {final['heldout_accuracy']:.3f} -> {model_dir}")  # fmt: skip
        run.close()
        return summary

    def step(self) -> dict[str, Any]:
        """One GRPO step: rollouts, rewards, advantages, ``mu`` optimizer steps; its metrics."""
        c, run = self.config, self.run
        lr = run.set_lr(c.max_steps)
        first = run.step * c.prompts_per_step + run.dist.rank * self.local_prompts
        problems = [self.task.train(first + i) for i in range(self.local_prompts)]
        texts = [self.prompt_text(p) for p in problems]
        t0 = time.perf_counter()
        rollouts = self.rollouts.generate([self.encode(t) for t in texts], c.group_size, self._params(False),
                                          seed=c.seed * 1_000_003 + run.step * 65_537 + first * c.group_size)  # fmt: skip
        gen_s = time.perf_counter() - t0
        scores = torch.tensor([self.task.score(problems[r.prompt_index], r.text, texts[r.prompt_index]) for r in rollouts])
        advantages = group_advantages(scores[:, 0], c.group_size, scale=c.scale_rewards)
        batch = rollout_batch(rollouts, advantages, run.device)
        t1 = time.perf_counter()
        learn = self._learn(batch)
        learn_s = time.perf_counter() - t1
        run.step += 1
        self.rollouts.sync(run.base)
        completion_tokens = sum(len(r.completion_ids) for r in rollouts)
        totals = self._sum([scores[:, 0].sum(), scores[:, 0].pow(2).sum(), scores[:, 1].sum(), scores[:, 2].sum(), float(completion_tokens), float(len(rollouts))])
        n = totals[5]
        mean = totals[0] / n
        return {
            "step": run.step, "lr": lr, "reward_mean": mean, "reward_std": max(totals[1] / n - mean**2, 0.0) ** 0.5,
            "accuracy": totals[2] / n, "format": totals[3] / n, "completion_length": totals[4] / n, **learn,
            "generation_s": gen_s, "learning_s": learn_s, "rollout_tokens_per_s": completion_tokens / max(gen_s, 1e-9),
            "train_tokens_per_s": c.mu * int(batch.mask.shape[0] * batch.mask.shape[1]) / max(learn_s, 1e-9),
        }  # fmt: skip

    def _learn(self, batch: Batch) -> dict[str, float]:
        c, run = self.config, self.run
        n = batch.inputs.shape[0]
        slices = [slice(i, min(i + c.micro_batch_size, n)) for i in range(0, n, c.micro_batch_size)]
        world = run.dist.world
        # DDP averages gradients over ranks: scaling each rank's denominators by 1/world gives the global mean
        total_tokens, total_seqs = (v / world for v in self._sum([batch.mask.sum().float(), float(n)]))
        old = ref = None
        if c.mu > 1:
            old = self._logprobs(run.wrapped, batch, slices)
        if self.reference is not None:
            ref = self._logprobs(self.reference, batch, slices)
        stats = {"loss": 0.0, "kl": 0.0, "clip_fraction": 0.0, "entropy": 0.0, "logprob_gap": 0.0, "grad_norm": 0.0}
        tokens = max(float(batch.mask.sum()), 1.0)
        for iteration in range(c.mu):
            for k, part in enumerate(slices):
                mask = batch.mask[part]
                with distributed.maybe_no_sync(run.wrapped, k == len(slices) - 1), run.autocast():
                    logits = run.wrapped(batch.inputs[part])
                logprobs = token_logprobs(logits, batch.targets[part])
                parts = grpo_loss(
                    logprobs, old[part] if old is not None else logprobs.detach(), batch.advantages[part], mask,
                    clip_low=c.clip_low, clip_high=c.clip_high, beta=c.beta, ref_logprobs=ref[part] if ref is not None else None,
                    aggregation=c.aggregation, total_tokens=total_tokens, total_seqs=total_seqs,
                )  # fmt: skip
                parts.loss.backward()
                share = float(mask.sum()) / tokens / c.mu
                stats["loss"] += float(parts.loss.detach()) / c.mu
                stats["kl"] += float(parts.kl) * share
                stats["clip_fraction"] += float(parts.clip_fraction) * share
                if iteration == 0:
                    with torch.no_grad():
                        m = mask.float()
                        stats["entropy"] += float((token_entropy(logits) * m).sum()) / tokens
                        stats["logprob_gap"] += float(((logprobs - batch.engine_logprobs[part]).abs() * m).sum()) / tokens
            stats["grad_norm"] += run.optimizer_step() / c.mu
        return dict(zip(stats, self._sum(list(stats.values()), mean=True)))

    @torch.no_grad()
    def _logprobs(self, model, batch: Batch, slices: list[slice]) -> torch.Tensor:
        out = torch.zeros(batch.targets.shape, device=batch.targets.device)
        for part in slices:
            with self.run.autocast():
                logits = model(batch.inputs[part])
            out[part] = token_logprobs(logits, batch.targets[part])
        return out

    # -- held-out evaluation ----------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Greedy completions of the held-out problems (split over the ranks): mean reward, accuracy,
        format and completion length."""
        problems = self.task.heldout_problems()[: self.config.eval_problems]
        mine = problems[self.run.dist.rank :: self.run.dist.world]
        texts = [self.prompt_text(p) for p in mine]
        outs = self.rollouts.llm.generate([self.encode(t) for t in texts], self._params(True)) if mine else []
        scores = [self.task.score(p, o.outputs[0].text, t) for p, o, t in zip(mine, outs, texts)]
        sums = self._sum([sum(s[0] for s in scores), sum(s[1] for s in scores), sum(s[2] for s in scores),
                          float(sum(len(o.outputs[0].token_ids) for o in outs)), float(len(mine))])  # fmt: skip
        n = max(sums[4], 1.0)
        return {"heldout_reward": sums[0] / n, "heldout_accuracy": sums[1] / n, "heldout_format": sums[2] / n, "heldout_length": sums[3] / n}

    def _sum(self, values: list, mean: bool = False) -> list[float]:
        """``values`` summed (or averaged) over the ranks."""
        t = torch.tensor([float(v) for v in values], dtype=torch.float64)
        if self.run.dist.world > 1:
            t = t.to(self.run.device)
            dist.all_reduce(t)
            t = t.cpu() / (self.run.dist.world if mean else 1)
        return t.tolist()


def _first_eval(metrics_file: Path) -> dict[str, Any]:
    import json

    if not metrics_file.is_file():
        return {}
    for line in metrics_file.read_text().splitlines():
        record = json.loads(line)
        if record.get("step") == 0 and "heldout_reward" in record:
            return record
    return {}
