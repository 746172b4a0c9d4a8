"""GRPO end to end on a tiny model built here: it learns a trivially learnable task (answer 7), a run
interrupted and resumed from a checkpoint repeats the uninterrupted one's metrics exactly, two
processes under torchrun (gloo) take the steps one process takes, and the CLI runs a whole recipe
(config, task file, report)."""

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from reason_models import seven_problems, tiny_reasoning_dir

from r1kit.reason.config import GRPOConfig, OptimConfig
from r1kit.reason.grpo import GRPOTrainer
from r1kit.reason.tasks import TaskConfig

TIMINGS = {"generation_s", "learning_s", "rollout_tokens_per_s", "train_tokens_per_s", "elapsed_s"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    return tiny_reasoning_dir(root / "model"), seven_problems(root)


def task(problems):
    return TaskConfig(name=str(problems), heldout=3, instruction="", require_think=False, format_weight=0.0)


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_grpo_learns_a_trivial_task(setup, tmp_path, monkeypatch):
    monkeypatch.setenv("R1KIT_NO_PROGRESS", "1")
    model, problems = setup
    config = GRPOConfig(prompts_per_step=2, group_size=16, max_new_tokens=1, max_steps=10, eval_every=0, save_every=100, device="cpu")
    summary = GRPOTrainer(model, task(problems), config, OptimConfig(lr=0.03, warmup_steps=0, beta2=0.9), tmp_path / "run", log=lambda _: None).train()
    steps = [r for r in records(tmp_path / "run") if "reward_mean" in r]
    assert summary["heldout_accuracy_before"] == 0.0 and summary["heldout_accuracy"] == 1.0
    early = sum(r["reward_mean"] for r in steps[:3]) / 3
    late = sum(r["reward_mean"] for r in steps[-3:]) / 3
    assert late > early + 0.5
    assert all(r["logprob_gap"] < 1e-4 for r in steps)  # the engine sampled from the policy being trained
    assert (tmp_path / "run" / "report.html").is_file() and (tmp_path / "run" / "reward.png").is_file()


def test_a_resumed_run_repeats_the_uninterrupted_one(setup, tmp_path, monkeypatch):
    monkeypatch.setenv("R1KIT_NO_PROGRESS", "1")
    model, problems = setup
    config = GRPOConfig(prompts_per_step=2, group_size=4, max_new_tokens=2, max_steps=4, mu=2, micro_batch_size=3, beta=0.1,
                        eval_every=0, save_every=2, device="cpu")  # fmt: skip
    optim = OptimConfig(lr=0.01, warmup_steps=1)
    out = tmp_path / "run"
    GRPOTrainer(model, task(problems), config, optim, out, log=lambda _: None).train()
    whole = records(out)
    import shutil

    shutil.rmtree(out / "checkpoints" / "step-0000004")  # as if the run had died after step 3
    GRPOTrainer(model, task(problems), config, optim, out, resume=True, log=lambda _: None).train()
    resumed = records(out)
    strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMINGS} for r in rs]
    assert strip(resumed) == strip(whole)
    assert any(r.get("kl", 0) > 0 for r in whole) and any(r.get("clip_fraction", 0) > 0 for r in whole)


def test_the_cli_runs_a_recipe(setup, tmp_path, monkeypatch, capsys):
    from r1kit.cli import grpo as cli

    monkeypatch.setenv("R1KIT_NO_PROGRESS", "1")
    model, problems = setup
    config = tmp_path / "grpo.yaml"
    config.write_text(yaml.safe_dump({
        "task": {"heldout": 3, "instruction": "", "require_think": False},
        "grpo": {"prompts_per_step": 2, "group_size": 2, "max_new_tokens": 2, "max_steps": 2, "eval_every": 1, "device": "cpu"},
        "optim": {"lr": 1e-3},
    }))  # fmt: skip
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    out = tmp_path / "run"
    assert cli.run(parser.parse_args(["--model", str(model), "--task", str(problems), "--config", str(config), "--out", str(out)])) == 0
    assert "report:" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and (out / "model" / "config.json").is_file() and (out / "model" / "tokenizer.json").is_file()
    assert sum("heldout_reward" in r for r in records(out)) == 3  # before, at step 1, after
    config.write_text(yaml.safe_dump({"grpo": {"group_size": 1}}))
    from r1kit.errors import ConfigError

    with pytest.raises(ConfigError, match="group_size"):
        cli.run(parser.parse_args(["--model", str(model), "--task", str(problems), "--config", str(config), "--out", str(out)]))


def test_two_processes_under_torchrun_take_the_steps_of_one(setup, tmp_path, monkeypatch):
    """Data parallel: each rank samples and learns on half the prompts, DDP averages the gradients, and
    the losses are normalised by the whole batch's totals, so the run equals one process's."""
    monkeypatch.setenv("R1KIT_NO_PROGRESS", "1")
    model, problems = setup
    grpo = dict(prompts_per_step=4, group_size=4, max_new_tokens=2, max_steps=3, mu=2, micro_batch_size=3, beta=0.1,
                eval_every=0, save_every=100, device="cpu")  # fmt: skip
    optim = dict(lr=0.01, warmup_steps=1)
    GRPOTrainer(model, task(problems), GRPOConfig(**grpo), OptimConfig(**optim), tmp_path / "one", log=lambda _: None).train()
    config = tmp_path / "grpo.yaml"
    config.write_text(yaml.safe_dump({"task": {"heldout": 3, "instruction": "", "require_think": False, "format_weight": 0.0},
                                      "grpo": grpo, "optim": optim}))  # fmt: skip
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "r1kit.cli", "grpo",
         "--model", str(model), "--task", str(problems), "--config", str(config), "--out", str(tmp_path / "two")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = ([r for r in records(tmp_path / run) if "reward_mean" in r] for run in ("one", "two"))
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert a["reward_mean"] == pytest.approx(b["reward_mean"], abs=1e-9)  # the same completions were drawn
        assert a["completion_length"] == pytest.approx(b["completion_length"], abs=1e-9)
        for key in ("loss", "kl", "clip_fraction"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
    from r1kit.checkpoints import load_model

    a, b = load_model(tmp_path / "one" / "model"), load_model(tmp_path / "two" / "model")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=name)
