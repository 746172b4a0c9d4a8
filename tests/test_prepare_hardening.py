"""Issue 22, prepare part: special files skipped unopened, an empty corpus a clear error naming the
stage, odd input folders (output inside the inputs, symlink loops) and a full disk while writing shards."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from r1kit.data.config import PrepareConfig
from r1kit.data.pipeline import EmptyCorpusError, run_prepare
from r1kit.errors import CheckpointError, ConfigError


def write_corpus(root: Path, n: int = 12) -> Path:
    """Small, distinct Python files: code passes the language filter by type, so no detector is needed."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        body = "\n".join(f"    total_{i}_{k} = value * {i * 31 + k} + offset_{k % 7}" for k in range(12))
        (root / f"mod{i:02d}.py").write_text(f"def compute_{i}(value, offset_{i}):\n{body}\n    return total_{i}_0\n")
    return root


def config(inputs, out: Path, **kw) -> PrepareConfig:
    base = dict(inputs=tuple(str(i) for i in inputs), output=str(out), vocab_size=300, min_tokens=4, workers=1,
                progress=False, val_fraction=0.3)
    return PrepareConfig(**(base | kw))


def drops(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "dropped.jsonl").read_text().splitlines()]


def test_fifo_in_the_inputs_is_skipped_unopened(tmp_path):
    """Item 5: a FIFO in the input folder used to hang prepare forever; now it is dropped with a reason.

    Run in a subprocess with a timeout, so a regression fails instead of hanging the suite."""
    src = write_corpus(tmp_path / "in")
    os.mkfifo(src / "pipe.txt")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "r1kit.cli", "prepare", "--inputs", str(src), "--output", str(out), "--vocab-size", "300",
           "--min-tokens", "4", "--workers", "1", "--no-progress", "--val-fraction", "0.3"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("prepare blocked on the FIFO in its inputs")
    assert r.returncode == 0, r.stderr
    fifo = next(d for d in drops(out) if d["source"].endswith("pipe.txt"))
    assert fifo["reason"] == "special_file" and "FIFO" in fifo["detail"]


@pytest.mark.parametrize("case, stage, words", [
    ("unsupported", "clean", ["read/unsupported_type", "--text-extensions"]),
    ("too_short", "length", ["length/too_short", "--min-tokens"]),
    ("nothing", "clean", ["no documents found"]),
])
def test_corpus_where_everything_is_dropped_is_a_clear_error(tmp_path, case, stage, words):
    """Item 5: prepare used to "succeed" with 0 tokens; now it fails naming the stage and the reasons."""
    src = tmp_path / "in"
    if case == "unsupported":
        src.mkdir()
        (src / "data.bin").write_bytes(b"\x00" * 10)
    elif case == "too_short":
        write_corpus(src, 3)
    else:
        src.mkdir()
    out = tmp_path / "out"
    with pytest.raises(EmptyCorpusError) as info:
        run_prepare(config([src], out, min_tokens=10_000 if case == "too_short" else 4), log=lambda _: None)
    message = str(info.value)
    assert all(w in message for w in words), message
    assert case == "nothing" or f"the {stage} stage dropped all" in message
    assert not (out / "report.json").exists() and not (out / "shards").exists()


def test_all_documents_in_the_val_split_is_a_clear_error(tmp_path):
    """Item 5: a train split with no document is an error from prepare, not a shard folder train dies on."""
    src = write_corpus(tmp_path / "in", 2)
    with pytest.raises(EmptyCorpusError, match="none to train.*--val-fraction"):
        run_prepare(config([src], tmp_path / "out", val_fraction=0.999), log=lambda _: None)
    assert not (tmp_path / "out" / "shards").exists()


def test_empty_corpus_is_an_error_from_the_cli(tmp_path, capsys):
    """Item 5: `r1kit prepare` exits 2 with the message, no traceback and no success table."""
    from r1kit.cli import main

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.bin").write_bytes(b"\x01")
    rc = main(["prepare", "--inputs", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--workers", "1",
               "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 2 and "the clean stage dropped all 1 document (read/unsupported_type: 1)" in captured.err and "shards (" not in captured.out


def test_output_inside_the_inputs_is_never_read(tmp_path):
    """Other hole: --output inside --inputs used to feed prepare its own work files on a re-run."""
    src = write_corpus(tmp_path / "in")
    out = src / "prepared"
    first = run_prepare(config([src], out), log=lambda _: None)
    logs: list[str] = []
    second = run_prepare(config([src], out), log=logs.append)
    assert second["fingerprint"] == first["fingerprint"] and sum("reused" in line for line in logs) == 6
    assert second["shards"] == first["shards"]
    assert any(d["reason"] == "output_folder" for d in drops(out))


def test_input_inside_the_output_is_an_error(tmp_path):
    out = tmp_path / "out"
    src = write_corpus(out / "raw")
    with pytest.raises(ConfigError, match="inside the output folder"):
        run_prepare(config([src], out), log=lambda _: None)


def test_symlink_loop_in_the_inputs_is_read_once(tmp_path):
    """Other hole: a link back to an ancestor is followed once and reported, never looped through."""
    src = write_corpus(tmp_path / "in")
    (src / "sub").mkdir()
    (src / "sub" / "back").symlink_to(src, target_is_directory=True)
    (src / "self").symlink_to("self")  # a link to itself: ELOOP on open
    out = tmp_path / "out"
    report = run_prepare(config([src], out), log=lambda _: None)
    reasons = {Path(d["source"]).name: d["reason"] for d in drops(out)}
    assert reasons["back"] == "repeated_folder" and reasons["self"] == "unreadable"
    assert report["shards"]["train"]["documents"] + report["shards"]["val"]["documents"] == 12


def test_missing_tokenizer_fails_before_any_stage_runs(tmp_path):
    """Other hole: --tokenizer naming a missing file used to fail only after the clean and dedup passes."""
    src = write_corpus(tmp_path / "in")
    with pytest.raises(CheckpointError, match="no tokenizer at"):
        run_prepare(config([src], tmp_path / "out", tokenizer=str(tmp_path / "nope.json")), log=lambda _: None)
    assert not (tmp_path / "out").exists()


def test_disk_full_while_writing_shards_leaves_nothing_half_written(tmp_path, monkeypatch):
    """Other hole: a full disk seen at a shard's final flush used to leave its temporary file behind."""
    src = write_corpus(tmp_path / "in")
    out = tmp_path / "out"
    real_fsync = os.fsync

    def full_for_shards(fd):
        if "shards.tmp" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_for_shards)
    with pytest.raises(OSError, match="No space left"):
        run_prepare(config([src], out), log=lambda _: None)
    monkeypatch.undo()
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name] and not (out / "shards").exists()
    report = run_prepare(config([src], out), log=lambda _: None)  # the re-run resumes and finishes
    assert report["shards"]["train"]["documents"] + report["shards"]["val"]["documents"] == 12
