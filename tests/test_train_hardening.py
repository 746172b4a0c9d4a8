"""Issue 22, trainer part: verified checkpoints that resume from the newest intact one, trainer state
loaded without arbitrary pickle, and empty train/val data refused before anything is written."""

import errno
import json
import os
import shutil

import numpy as np
import pytest
import torch

from r1kit.config import ModelConfig
from r1kit.data.records import write_json
from r1kit.data.shards import FORMAT, INDEX, ShardWriter
from r1kit.errors import CheckpointError, ConfigError
from r1kit.train.checkpoint import MANIFEST, write_manifest
from r1kit.train.config import TrainConfig
from r1kit.train.trainer import Trainer

os.environ["R1KIT_NO_PROGRESS"] = "1"
MODEL = ModelConfig(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32)


def write_shards(out, train_docs=20, val_docs=3):
    out.mkdir(parents=True)
    writers = {s: ShardWriter(out, s, 1000, np.uint16) for s in ("train", "val")}
    for split, n in (("train", train_docs), ("val", val_docs)):
        for d in range(n):
            writers[split].add(f"{split}{d}", np.concatenate(([0], (d + np.arange(60)) % 60 + 2, [1])))
    index = {"format": FORMAT, "dtype": "uint16", "vocab_size": 64, "bos_id": 0, "eos_id": 1, "val_fraction": 0.1,
             "splits": {s: w.close() for s, w in writers.items()}}
    write_json(out / INDEX, index)
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("data") / "shards")


def make(shards, out, **kw):
    base = dict(data=str(shards), out=str(out), seq_len=16, micro_batch_size=2, max_steps=4, warmup_steps=1,
                eval_every=0, log_every=1, save_every=2, keep_last=3, eval_batches=1)
    return TrainConfig(**(base | kw))


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory):
    """A finished run with intact checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("run")
    Trainer(MODEL, make(shards, out), log=lambda _: None).run()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]
    return out


@pytest.fixture
def run_copy(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


def resume(shards, out):
    logs = []
    trainer = Trainer(None, make(shards, out), resume=True, log=logs.append)
    return trainer, "\n".join(logs)


def truncate(path, keep=0.5):
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])


@pytest.mark.parametrize("damage", ["truncated_state", "empty_state", "truncated_weights"])
def test_damaged_checkpoint_falls_back_to_the_previous_intact_one(shards, run_copy, damage):
    """Item 4: a truncated or empty trainer_state.pt, or a truncated model.safetensors, in the newest
    checkpoint: resume skips it, says why, and starts from the one before."""
    newest = run_copy / "checkpoints" / "step-0000004"
    if damage == "truncated_state":
        truncate(newest / "trainer_state.pt")
    elif damage == "empty_state":
        (newest / "trainer_state.pt").write_bytes(b"")
    else:
        truncate(newest / "model.safetensors")
    trainer, log = resume(shards, run_copy)
    assert trainer.state.step == 2
    assert f"skipping checkpoint {newest}" in log and "manifest" in log
    assert "resumed from" in log and "step-0000002" in log


def test_damaged_checkpoint_without_manifest_falls_back_too(shards, run_copy):
    """Item 4: checkpoints written before manifests existed are checked by loading their files."""
    for step in ("step-0000002", "step-0000004"):
        (run_copy / "checkpoints" / step / MANIFEST).unlink()
    truncate(run_copy / "checkpoints" / "step-0000004" / "model.safetensors")
    trainer, log = resume(shards, run_copy)
    assert trainer.state.step == 2 and "model.safetensors is truncated or corrupt" in log


def test_no_intact_checkpoint_is_a_clear_error(shards, run_copy):
    """Item 4: when every checkpoint is damaged, resume says so and how to start over."""
    for step in ("step-0000002", "step-0000004"):
        (run_copy / "checkpoints" / step / "trainer_state.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"no intact checkpoint.*step-0000002.*start over"):
        resume(shards, run_copy)


class _WritesAFile:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def test_checkpoint_whose_pickle_runs_code_is_refused(shards, run_copy, tmp_path):
    """Item 4: trainer_state.pt is read with weights_only=True: a payload (even with a forged,
    matching manifest) is refused unopened and resume falls back to the previous checkpoint."""
    marker = tmp_path / "pwned"
    newest = run_copy / "checkpoints" / "step-0000004"
    state = torch.load(newest / "trainer_state.pt", weights_only=True)
    torch.save({**state, "payload": _WritesAFile(marker)}, newest / "trainer_state.pt")
    write_manifest(newest)
    trainer, log = resume(shards, run_copy)
    assert not marker.exists()
    assert trainer.state.step == 2 and "refused unopened" in log


def test_saved_state_is_plain_data(run_copy):
    """Item 4: what the trainer writes loads with weights_only=True, and the manifest covers every file."""
    newest = run_copy / "checkpoints" / "step-0000004"
    state = torch.load(newest / "trainer_state.pt", weights_only=True)
    assert state["loop"]["step"] == 4 and isinstance(state["rng"]["torch"], torch.Tensor)
    manifest = json.loads((newest / MANIFEST).read_text())
    assert set(manifest["files"]) == {p.relative_to(newest).as_posix() for p in newest.rglob("*") if p.is_file()} - {MANIFEST}


def test_train_on_empty_shards_is_a_clear_error_and_writes_nothing(tmp_path, capsys):
    """Item 5: no train blocks -> a clear error from `r1kit train` before the run directory is touched."""
    from r1kit.cli import main

    empty = write_shards(tmp_path / "shards", train_docs=0)
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {json.dumps(MODEL.to_dict())}\ntrain: {json.dumps(dict(data=str(empty), out=str(out)))}\n")
    assert main(["train", "--config", str(config)]) == 2
    assert "train split" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_empty_val_split_is_a_clear_error_when_validation_is_asked_for(tmp_path):
    """Item 5: eval_every > 0 with no val block -> an error naming val_fraction; nothing written."""
    no_val = write_shards(tmp_path / "shards", val_docs=0)
    with pytest.raises(ConfigError, match=r"val split.*--val-fraction.*eval_every"):
        Trainer(MODEL, make(no_val, tmp_path / "run", eval_every=2))
    assert not (tmp_path / "run").exists()


def test_empty_val_split_with_validation_off_never_writes_nan(tmp_path):
    """Item 5: eval_every: 0 with no val data trains, says validation is off, and writes null, not NaN."""
    no_val = write_shards(tmp_path / "shards", val_docs=0)
    logs = []
    Trainer(MODEL, make(no_val, tmp_path / "run", max_steps=2), log=logs.append).run()
    text = (tmp_path / "run" / "summary.json").read_text()
    assert "NaN" not in text and json.loads(text)["val_loss"] is None
    assert any("without validation" in line for line in logs)


def test_checkpoints_path_that_is_a_file_fails_before_training(shards, tmp_path):
    """Other hole: <out>/checkpoints as a file used to fail only at the first save."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("not a folder")
    with pytest.raises(ConfigError, match="is not a folder"):
        Trainer(MODEL, make(shards, tmp_path / "run"))


def test_missing_tokenizer_named_by_the_index_is_a_clear_error(tmp_path):
    """Other hole: a shard index naming a tokenizer that is gone used to export a model without one."""
    data = write_shards(tmp_path / "shards")
    index = json.loads((data / INDEX).read_text())
    write_json(data / INDEX, {**index, "tokenizer": "../tokenizer.json"})
    with pytest.raises(ConfigError, match="tokenizer.*missing"):
        Trainer(MODEL, make(data, tmp_path / "run"))


def test_disk_full_while_saving_keeps_the_previous_checkpoints(shards, run_copy, monkeypatch):
    """Other hole: a failed save leaves no partial checkpoint and a clear error; resume still works."""
    trainer, _ = resume(shards, run_copy)
    trainer.state.step = 6

    def disk_full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError, match="No space left.*--resume"):
        trainer.save()
    assert sorted(p.name for p in (run_copy / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]


def test_torn_metrics_line_does_not_break_resume(shards, run_copy):
    """Other hole: a metrics line cut by a kill or a full disk used to make resume raise."""
    with open(run_copy / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')
    trainer, _ = resume(shards, run_copy)
    steps = [json.loads(line)["step"] for line in (run_copy / "metrics.jsonl").read_text().splitlines()]
    assert trainer.state.step == 4 and steps == [1, 2, 3, 4]
