"""The training loop: schedule, accumulation, OOM recovery, exact resume, DDP parity, the CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from devices import needs_cuda

from r1kit.config import ModelConfig
from r1kit.data.records import write_json
from r1kit.data.shards import FORMAT, INDEX, ShardWriter
from r1kit.errors import ConfigError
from r1kit.train.config import TrainConfig, load_run_config
from r1kit.train.schedule import lr_at
from r1kit.train.trainer import Trainer

os.environ["R1KIT_NO_PROGRESS"] = "1"
MODEL = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
                    attention=["local", "hybrid"], ffn="topk", local_window=8, topk_sparsity=0.3)  # fmt: skip


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """A learnable corpus: each document counts upward modulo 60 from a random start, in a few shards."""
    out = tmp_path_factory.mktemp("data") / "shards"
    out.mkdir()
    rng = np.random.default_rng(0)
    writers = {s: ShardWriter(out, s, 1000, np.uint16) for s in ("train", "val")}
    for d in range(60):
        start, length = rng.integers(0, 60), rng.integers(40, 200)
        tokens = (start + np.arange(length)) % 60 + 2
        writers["val" if d % 10 == 0 else "train"].add(f"doc{d}", np.concatenate(([0], tokens, [1])))
    index = {"format": FORMAT, "dtype": "uint16", "vocab_size": 64, "bos_id": 0, "eos_id": 1, "splits": {s: w.close() for s, w in writers.items()}}
    write_json(out / INDEX, index)
    return out


def make(shards, out, **kw):
    base = dict(data=str(shards), out=str(out), seq_len=16, micro_batch_size=4, max_steps=6, warmup_steps=2, lr=3e-3,
                eval_every=0, log_every=1, save_every=3, eval_batches=2)  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def params(trainer):
    return torch.cat([p.detach().flatten() for p in trainer.model.parameters()])


def test_schedule_values():
    assert lr_at(0, 3e-4, 3e-5, 2000, 10000) == pytest.approx(3e-4 / 2000)
    assert lr_at(1999, 3e-4, 3e-5, 2000, 10000) == pytest.approx(3e-4)
    assert lr_at(6000, 3e-4, 3e-5, 2000, 10000) == pytest.approx((3e-4 + 3e-5) / 2)
    assert lr_at(10000, 3e-4, 3e-5, 2000, 10000) == lr_at(20000, 3e-4, 3e-5, 2000, 10000) == 3e-5


def test_accumulation_equals_one_large_batch(shards, tmp_path):
    results = []
    for micro, accum in ((4, 1), (2, 2), (1, 4)):
        t = Trainer(MODEL, make(shards, tmp_path / f"{micro}", micro_batch_size=micro, grad_accum=accum, max_steps=1))
        t._train_step()
        results.append(params(t))
    torch.testing.assert_close(results[1], results[0], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(results[2], results[0], atol=2e-6, rtol=1e-5)


def test_out_of_memory_halves_the_micro_batch_and_keeps_the_effective_batch(shards, tmp_path):
    ref = Trainer(MODEL, make(shards, tmp_path / "ref", micro_batch_size=8, max_steps=1))
    ref._train_step()
    t = Trainer(MODEL, make(shards, tmp_path / "oom", micro_batch_size=8, max_steps=1), log=lambda m: logs.append(m))
    logs = []
    forward = t.model.forward

    def tight_memory(tokens, *a, **kw):
        if tokens.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(tokens, *a, **kw)

    t.model.forward = tight_memory
    t._train_step()
    assert (t.state.micro_batch_size, t.state.grad_accum) == (2, 4)
    assert len(logs) == 2 and "effective batch 8 unchanged" in logs[-1]
    torch.testing.assert_close(params(t), params(ref), atol=2e-6, rtol=1e-5)


def test_resume_continues_the_same_loss_curve(shards, tmp_path):
    cfg = dict(max_steps=8, save_every=3, model_dropout=None)
    cfg.pop("model_dropout")
    dropout_model = ModelConfig(**{**MODEL.to_dict(), "dropout": 0.1})
    Trainer(dropout_model, make(shards, tmp_path / "straight", **cfg)).run()
    straight = [json.loads(l) for l in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]

    t = Trainer(dropout_model, make(shards, tmp_path / "killed", **cfg))
    step = t._train_step

    def killed_after_four():
        if t.state.step == 4:
            raise KeyboardInterrupt
        return step()

    t._train_step = killed_after_four
    with pytest.raises(KeyboardInterrupt):
        t.run()
    assert sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir()) == ["step-0000003"]
    Trainer(None, make(shards, tmp_path / "killed", **cfg), resume=True).run()
    resumed = [json.loads(l) for l in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == list(range(1, 9))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
    assert [r["sparsity"] for r in resumed] == [r["sparsity"] for r in straight]
    from r1kit.checkpoints import load_model

    exported = load_model(tmp_path / "killed" / "model")  # the sparsity the controller reached travels with the model
    assert {str(i): round(f.sparsity, 4) for i, f in exported.topk_layers()} == resumed[-1]["sparsity"]


def test_training_learns_and_the_cli_trains_and_evaluates(shards, tmp_path):
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(yaml_of(MODEL, data=shards, out=tmp_path / "run", seq_len=32, micro_batch_size=8, max_steps=60, warmup_steps=5,
                                lr=5.0e-3, eval_every=30, save_every=30, log_every=10))  # fmt: skip
    r = subprocess.run([sys.executable, "-m", "r1kit.cli", "train", "--config", str(run_yaml), "--keep-last", "1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 60 and summary["val_ppl"] < summary["unigram_ppl"] / 3
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-0000060"]
    ev = subprocess.run(
        [sys.executable, "-m", "r1kit.cli", "eval", "ppl", "--model", str(tmp_path / "run" / "model"), "--data", str(shards), "--seq-len", "32", "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert ev.returncode == 0, ev.stderr
    result = json.loads(ev.stdout)
    assert result["ppl"] == pytest.approx(summary["val_ppl"], rel=0.05) and len(result["by_position"]) == 4


def yaml_of(model, **train):
    return "model:\n" + "".join(f"  {k}: {json.dumps(v)}\n" for k, v in model.to_dict().items() if v is not None) + "train:\n" + "".join(
        f"  {k}: {v}\n" for k, v in train.items()
    )


def torchrun(cfg, *extra):
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "r1kit.cli", "train", "--config", str(cfg), *extra],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip


@pytest.mark.parametrize("mode", ["ddp", "tp"])
def test_two_processes_on_gloo_match_one_process(shards, tmp_path, mode):
    """DDP: each rank takes half the batch; TP: each rank holds half of every block. Same losses and weights."""
    tp = 2 if mode == "tp" else 1
    micro = 4 if mode == "tp" else 2
    single = Trainer(MODEL, make(shards, tmp_path / "one", micro_batch_size=4, max_steps=4, save_every=2, device="cpu"))
    single.run()
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml_of(MODEL, data=shards, out=tmp_path / "two", seq_len=16, micro_batch_size=micro, max_steps=4, warmup_steps=2,
                           lr=3.0e-3, eval_every=0, log_every=1, save_every=2, eval_batches=2, tensor_parallel=tp, device="cpu"))  # fmt: skip
    r = torchrun(cfg, "--max-steps", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    r = torchrun(cfg, "--resume")  # continue from the step-2 checkpoint to step 4
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {tmp_path / 'two' / 'checkpoints' / 'step-0000002'}" in r.stdout
    one = [json.loads(l)["loss"] for l in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(l)["loss"] for l in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert two == pytest.approx(one, abs=1e-5)
    from r1kit.checkpoints import load_model

    a, b = load_model(tmp_path / "one" / "model"), load_model(tmp_path / "two" / "model")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=name)


def test_more_processes_than_gpus_is_a_clear_error(monkeypatch):
    from r1kit.train import distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", str(torch.cuda.device_count()))  # one past the last GPU (0 here: none at all)
    with pytest.raises(ConfigError, match="needs its own GPU.*train.device=cpu"):
        distributed.setup(device="cuda")


def test_tensor_parallel_step_matches_one_device():
    cases = ("hybrid:topk:head", "hybrid:topk:token", "global:dense:token")
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "tests/tp_worker.py", *cases],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    diffs = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(diffs) == set(cases)
    for case, d in diffs.items():
        assert d["loss_diff"] < 1e-6 and d["grad_diff"] < 1e-6, (case, d)


@pytest.mark.parametrize(
    "train,match",
    [
        ("  lr: -1\n", "train.lr=-1.0 must be positive"),
        ("  grad_accum: 0\n", "train.grad_accum=0 must be a positive integer"),
        ("  learning_rate: 0.1\n", "unknown field\\(s\\) 'learning_rate'"),
        ("  precision: fp8\n", "precision='fp8' is not one of"),
        ("  device: tpu\n", "device='tpu' must be auto"),
    ],
)
def test_bad_run_configs(tmp_path, train, match):
    f = tmp_path / "bad.yaml"
    f.write_text("model:\n  vocab_size: 8\n  hidden_size: 8\n  num_layers: 1\n  num_heads: 2\n  intermediate_size: 8\ntrain:\n  data: d\n  out: o\n" + train)
    with pytest.raises(ConfigError, match=match):
        load_run_config(f)


def test_seed_reference_config_loads_with_the_seed_hyper_parameters():
    model, train = load_run_config("configs/seed-reference.yaml")
    assert (train.micro_batch_size, train.grad_accum, train.lr, train.warmup_steps, train.weight_decay) == (256, 4, 3e-4, 2000, 0.01)
    assert model.dropout == 0.1 and set(model.ffn) == {"topk"} and "hybrid" in model.attention


@pytest.mark.parametrize("precision, device", [("bf16", "cpu"), pytest.param("bf16", "cuda", marks=needs_cuda),
                                               pytest.param("fp16", "cuda", marks=needs_cuda)])
def test_mixed_precision_trains(shards, tmp_path, precision, device):
    out = tmp_path / precision
    t = Trainer(MODEL, make(shards, out, precision=precision, device=device, max_steps=3, save_every=10))
    summary = t.run()
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite([r["loss"] for r in records])) and np.isfinite(summary["val_loss"])
    # the hybrid layer's mean gate, which the trainer's forward hooks on its gate network record
    assert all(set(r["gate"]) == {"1"} and 0 < r["gate"]["1"] < 1 for r in records)
    assert t.model.dtype == torch.float32 and t.model.device.type == device  # autocast keeps float32 master weights


def test_fp16_needs_cuda(shards, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: fp16 is allowed")
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        Trainer(MODEL, make(shards, tmp_path / "fp16", precision="fp16"))
