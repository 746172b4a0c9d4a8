"""`r1kit sft` end to end on a tiny model: full fine-tuning and LoRA (merged on save) learn the
assistant turns, a resumed run repeats the uninterrupted one's metrics, and two processes under
torchrun (gloo) take the steps of one."""

import argparse
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from reason_models import tiny_reasoning_dir

from r1kit.checkpoints import load_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    chats = root / "chats.jsonl"
    rows = [{"prompt": f"p{i}q", "completion": str((i * 3) % 10)} for i in range(8)]
    rows.append({"messages": [{"role": "user", "content": "p1q"}, {"role": "assistant", "content": "3"},
                              {"role": "user", "content": "p2q"}, {"role": "assistant", "content": "6"}]})  # fmt: skip
    chats.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tiny_reasoning_dir(root / "model"), chats


def run_sft(model, chats, out, *extra):
    from r1kit.cli import sft as cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return cli.run(parser.parse_args(["--model", str(model), "--data", str(chats), "--out", str(out), "--device", "cpu", *extra]))


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def answer(model_dir, prompt: str) -> int:
    from r1kit.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    model = load_model(model_dir)
    ids = tok.encode(f"{prompt}\n=", add_special_tokens=False).ids
    with torch.no_grad():
        return tok.decode([int(model(torch.tensor([ids]))[0, -1].argmax())])


@pytest.mark.parametrize("lora", [False, True])
def test_sft_learns_the_assistant_turns(setup, tmp_path, monkeypatch, lora):
    monkeypatch.setenv("R1KIT_NO_PROGRESS", "1")
    model, chats = setup
    config = tmp_path / "sft.yaml"
    steps = 12 if lora else 40
    config.write_text(yaml.safe_dump({"sft": {"seq_len": 32, "micro_batch_size": 2, "max_steps": steps, "log_every": 4},
                                      "optim": {"lr": 3e-2 if lora else 1e-2, "warmup_steps": 0}}))  # fmt: skip
    out = tmp_path / "run"
    assert run_sft(model, chats, out, "--config", str(config), *(["--lora-rank", "8"] if lora else [])) == 0
    losses = [r["loss"] for r in metrics(out)]
    trained = load_model(out / "model").state_dict()
    base = load_model(model).state_dict()
    assert set(trained) == set(base)  # a plain model directory: adapters merged, no LoRA names
    if not lora:
        assert losses[-1] < 0.5 * losses[0]
        assert [answer(out / "model", f"p{i}q") for i in range(8)] == [str((i * 3) % 10) for i in range(8)]
        assert not torch.equal(base["model.embed_tokens.weight"], trained["model.embed_tokens.weight"])
        return
    assert losses[-1] < losses[0] - 0.1
    # merged on save: W + (alpha / r)·B·A from the adapters the last checkpoint holds, and nothing else moved
    state = torch.load(out / "checkpoints" / f"step-{steps:07d}" / "trainer_state.pt", weights_only=True)
    adapters = state["adapters"]
    merged = 0
    for name, weight in base.items():
        stem = "base_model.model." + name.removesuffix(".weight")
        a, b = adapters.get(f"{stem}.lora_A.default.weight"), adapters.get(f"{stem}.lora_B.default.weight")
        expected = weight if a is None else weight + (16.0 / 8) * b @ a
        merged += a is not None
        torch.testing.assert_close(trained[name], expected, atol=1e-5, rtol=1e-5)
    assert merged == 2 * 7  # seven projections in each of the two layers


@pytest.mark.parametrize("lora", [False, True])
def test_a_resumed_sft_run_repeats_the_uninterrupted_one(setup, tmp_path, monkeypatch, lora):
    monkeypatch.setenv("R1KIT_NO_PROGRESS", "1")
    model, chats = setup
    config = tmp_path / "sft.yaml"
    config.write_text(yaml.safe_dump({"sft": {"seq_len": 16, "micro_batch_size": 2, "grad_accum": 2, "max_steps": 6, "log_every": 1,
                                              "save_every": 3, "packing": False}, "optim": {"lr": 1e-2, "warmup_steps": 2}}))  # fmt: skip
    out = tmp_path / "run"
    extra = ["--config", str(config), *(["--lora-rank", "4"] if lora else [])]
    run_sft(model, chats, out, *extra)
    whole = metrics(out)
    shutil.rmtree(out / "checkpoints" / "step-0000006")
    run_sft(model, chats, out, *extra, "--resume")
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")} for r in rs]
    assert strip(metrics(out)) == strip(whole)


def test_two_processes_under_torchrun_take_the_steps_of_one(setup, tmp_path, monkeypatch):
    """Each rank takes half of a step's rows (micro-batch 2 on two ranks, 4 on one): the same losses and weights."""
    monkeypatch.setenv("R1KIT_NO_PROGRESS", "1")
    model, chats = setup
    configs = {}
    for name, micro in (("one", 4), ("two", 2)):
        configs[name] = tmp_path / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump({"sft": {"seq_len": 32, "micro_batch_size": micro, "max_steps": 4, "log_every": 1},
                                                 "optim": {"lr": 1e-2, "warmup_steps": 1}}))  # fmt: skip
    assert run_sft(model, chats, tmp_path / "one", "--config", str(configs["one"])) == 0
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "r1kit.cli", "sft",
         "--model", str(model), "--data", str(chats), "--out", str(tmp_path / "two"), "--device", "cpu", "--config", str(configs["two"])],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = ([m["loss"] for m in metrics(tmp_path / run) if "loss" in m] for run in ("one", "two"))
    assert len(one) == 4 and two == pytest.approx(one, abs=1e-5)
    a, b = load_model(tmp_path / "one" / "model"), load_model(tmp_path / "two" / "model")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=name)
