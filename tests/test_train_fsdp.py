"""FSDP2 and FSDP2 + tensor parallelism in training (gloo, several CPU processes): the same losses and
weights as one process with the same global batch, and checkpoints that resume on another number of
processes (2 -> 1, 1 -> 2, 4 -> 1) exactly where an uninterrupted run would be.

The reference is the plain single-process trainer (no process group, no DTensor). Every layout
takes 4 sequences per step: one process 4 x 1 micro-batch, FSDP over 2 processes 1 x 2 accumulated
per rank, the 2 x 2 grid (FSDP over 2 x tensor parallel 2) 2 per data-parallel rank. One torchrun
launch per layout runs all its training (start-up dominates), through the ``r1kit train`` command line.
"""

import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch
from test_train import shards, yaml_of  # noqa: F401  (shards: the learnable corpus fixture)

from r1kit.checkpoints import load_model
from r1kit.config import ModelConfig
from r1kit.errors import CheckpointError, ConfigError
from r1kit.train import distributed
from r1kit.train.checkpoint import write_manifest
from r1kit.train.config import TrainConfig
from r1kit.train.trainer import Trainer

os.environ["R1KIT_NO_PROGRESS"] = "1"
# tied embeddings: one parameter under two names, which FSDP's root unit and the checkpoint's
# name-keyed optimizer state must both handle
MODEL = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
                    attention=["local", "hybrid"], ffn="topk", local_window=8, topk_sparsity=0.3, tie_embeddings=True)  # fmt: skip
# warm-up covers steps 1-2, so a run stopped by --max-steps 2 had the learning rates of the 4-step run
# grad_clip below the gradients' norm: every step is clipped, by the norm taken over the shards
RUN = dict(seq_len=16, max_steps=4, warmup_steps=2, lr=3e-3, grad_clip=0.5, eval_every=0, log_every=1, save_every=2, keep_last=2, device="cpu")
# float32 sums taken in another order (the all-reduce, the reduce-scatter, a sharded matmul) differ in
# the last bits; AdamW's first steps divide by the gradients' own size, which lifts those bits of the
# smallest gradients well above float32's epsilon, still far under ATOL. A wrong shard, scale, clip or
# missed update moves weights by the order of the learning rate, a hundred times ATOL.
ATOL, RTOL = 2e-5, 1e-4


def single(data, out, resume=False, **kw):
    return Trainer(None if resume else MODEL, TrainConfig(data=str(data), out=str(out), **{**RUN, "micro_batch_size": 4, "eval_batches": 2, **kw}), resume=resume, log=print)


def assert_same_curve(out, reference, steps=4):
    """Loss, gradient norm (before clipping) and tokens seen, step by step, as the reference logged them."""
    got, want = (
        [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][:steps] for run in (out, reference)
    )
    assert [r["step"] for r in got] == list(range(1, steps + 1))
    assert [r["tokens"] for r in got] == [r["tokens"] for r in want]
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], abs=ATOL)
    assert [r["grad_norm"] for r in got] == pytest.approx([r["grad_norm"] for r in want], abs=ATOL)
    assert all(r["grad_norm"] > RUN["grad_clip"] for r in want)  # clipping was at work


def assert_same_validation(out, reference):
    """The final validation loss, which every rank computes through its own shards of the model (over
    ``eval_batches × micro_batch_size`` blocks: the configs keep that product at 8)."""
    got, want = (json.loads((run / "summary.json").read_text())["val_loss"] for run in (out, reference))
    assert got == pytest.approx(want, abs=ATOL)


def assert_same_weights(a_dir, b_dir):
    a, b = load_model(a_dir).state_dict(), load_model(b_dir).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=ATOL, rtol=RTOL, msg=k)


def launch(nproc, *runs, port):
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(port),
         "tests/tp_worker.py", "--train", *runs],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r.stdout


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):  # noqa: F811
    """One process, 4 steps uninterrupted: checkpoints at steps 2 and 4, the exported model at 4."""
    out = tmp_path_factory.mktemp("reference")
    single(shards, out).run()
    return out


def resumable_copy(run, step, dest):
    """``run``'s checkpoint of ``step`` (and its metrics) alone in a new run folder ``dest``."""
    name = f"step-{step:07d}"
    shutil.copytree(run / "checkpoints" / name, dest / "checkpoints" / name)
    shutil.copyfile(run / "metrics.jsonl", dest / "metrics.jsonl")
    return dest


@pytest.fixture(scope="module")
def fsdp_runs(shards, reference, tmp_path_factory):  # noqa: F811
    """2 processes, FSDP2: a fresh run stopped at step 2, and the reference's step-2 checkpoint resumed to step 4."""
    root = tmp_path_factory.mktemp("fsdp")
    cfg = root / "run.yaml"
    cfg.write_text(yaml_of(MODEL, data=shards, out=root / "two", micro_batch_size=1, grad_accum=2, eval_batches=8, data_parallel="fsdp", **RUN))
    one_to_two = resumable_copy(reference, 2, root / "one_to_two")
    stdout = launch(2, f"--config {cfg} --max-steps 2", f"--config {cfg} --out {one_to_two} --resume", port=29561)
    return {"two": root / "two", "one_to_two": one_to_two, "stdout": stdout, "root": root}


@pytest.fixture(scope="module")
def grid_runs(shards, tmp_path_factory):  # noqa: F811
    """4 processes as a 2 x 2 grid (FSDP2 over tensor parallelism): stopped at step 2, resumed on the same grid to 4."""
    root = tmp_path_factory.mktemp("grid")
    cfg = root / "run.yaml"
    cfg.write_text(yaml_of(MODEL, data=shards, out=root / "grid", micro_batch_size=2, eval_batches=4, data_parallel="fsdp", tensor_parallel=2, **RUN))
    stdout = launch(4, f"--config {cfg} --max-steps 2", f"--config {cfg} --resume", port=29571)
    return {"grid": root / "grid", "stdout": stdout, "root": root}


def test_fsdp_steps_match_one_process(fsdp_runs, reference):
    two = fsdp_runs["two"]
    assert_same_curve(two, reference, steps=2)
    # the step-2 weights: the FSDP run's export against the reference's checkpoint, both gathered whole
    assert_same_weights(reference / "checkpoints" / "step-0000002", two / "model")
    shards_written = sorted(p.name for p in (two / "checkpoints" / "step-0000002" / "optimizer").glob("*.distcp"))
    assert shards_written == ["__0_0.distcp", "__1_0.distcp"]  # each rank wrote its own optimizer shard


def test_two_processes_resume_a_one_process_checkpoint(fsdp_runs, reference):
    out = fsdp_runs["one_to_two"]
    assert "resuming 1 data-parallel rank(s) on 2: each takes 2 of the step's 4 sequences" in fsdp_runs["stdout"]
    assert_same_curve(out, reference)
    assert_same_weights(reference / "model", out / "model")
    assert_same_validation(out, reference)


def test_one_process_resumes_a_two_process_checkpoint(fsdp_runs, reference, shards):  # noqa: F811
    out = resumable_copy(fsdp_runs["two"], 2, fsdp_runs["root"] / "two_to_one")
    single(shards, out, resume=True).run()
    assert_same_curve(out, reference)
    assert_same_weights(reference / "model", out / "model")


def test_grid_matches_one_process_and_resumes_on_one(grid_runs, reference, shards):  # noqa: F811
    grid = grid_runs["grid"]
    assert f"resumed from {grid / 'checkpoints' / 'step-0000002'}" in grid_runs["stdout"]
    assert_same_curve(grid, reference)
    assert_same_weights(reference / "model", grid / "model")
    assert_same_validation(grid, reference)
    out = resumable_copy(grid, 2, grid_runs["root"] / "grid_to_one")
    single(shards, out, resume=True).run()
    assert_same_curve(out, reference)
    assert_same_weights(reference / "model", out / "model")


@pytest.mark.parametrize(
    "world, tp, dp, match",
    [
        (4, 3, "fsdp", "tensor_parallel=3 does not divide the 4 processes"),
        (1, 1, "fsdp", "data_parallel=fsdp with 1 process.* leaves one data-parallel rank.*--data-parallel ddp"),
        (2, 2, "fsdp", "data_parallel=fsdp with 2 process.* leaves one data-parallel rank"),
        (4, 2, "ddp", "make 2 data-parallel groups of tensor-parallel ranks, which needs FSDP: set train.data_parallel=fsdp"),
    ],
)
def test_layouts_the_processes_cannot_take_are_clear_errors(monkeypatch, world, tp, dp, match):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(ConfigError, match=match):
        distributed.setup(tp, "cpu", dp)


def test_data_parallel_is_validated_at_load(shards, tmp_path):  # noqa: F811
    with pytest.raises(ConfigError, match="train.data_parallel='zero3' is not one of \\('ddp', 'fsdp'\\)"):
        TrainConfig(data=str(shards), out=str(tmp_path), data_parallel="zero3")


class _WritesAFile:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_forged_optimizer_index_is_refused_unopened(reference, shards, tmp_path):  # noqa: F811
    """DCP's ``.metadata`` is a pickle: one carrying a payload (with a manifest forged to match) is refused, its code never run."""
    out = resumable_copy(reference, 2, tmp_path / "forged")
    checkpoint = out / "checkpoints" / "step-0000002"
    marker = tmp_path / "payload-ran"
    (checkpoint / "optimizer" / ".metadata").write_bytes(pickle.dumps(_WritesAFile(marker)))
    write_manifest(checkpoint)
    with pytest.raises(CheckpointError, match="was refused unopened: it names io.open, which DCP's metadata never holds"):
        single(shards, out, resume=True)
    assert not marker.exists()


def test_a_checkpoint_without_the_optimizer_folder_names_the_way_out(reference, shards, tmp_path):  # noqa: F811
    """An older r1kit's checkpoint kept the optimizer in trainer_state.pt, by position: it cannot be resharded."""
    out = resumable_copy(reference, 2, tmp_path / "older")
    checkpoint = out / "checkpoints" / "step-0000002"
    shutil.rmtree(checkpoint / "optimizer")
    write_manifest(checkpoint)
    with pytest.raises(CheckpointError, match="has no optimizer/ folder: an older r1kit wrote it.*train.init_from"):
        single(shards, out, resume=True)
