"""`r1kit prepare` end to end on slices of the embedded corpus: bad input, determinism, resume,
the distributed (Dask) path, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from r1kit.data import pipeline
from r1kit.data.config import PrepareConfig
from r1kit.data.pipeline import run_prepare
from r1kit.data.readers import RawDoc, iter_embedded
from r1kit.data.shards import ShardDataset, ShardWriter
from r1kit.tokenizer import SPECIAL_TOKENS, load_tokenizer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A slice of the embedded corpus as user input: every 25th stdlib module and 30 pydoc topics."""
    root = tmp_path_factory.mktemp("corpus")
    raws = [r for r in iter_embedded() if isinstance(r, RawDoc)]
    code = [r for r in raws if r.kind == "code"][::25]
    topics = [r for r in raws if r.kind == "text"][:30]
    (root / "code").mkdir()
    for r in code:
        (root / "code" / r.id.replace("/", "_")).write_bytes(r.payload)
    with open(root / "topics.jsonl", "w", encoding="utf-8") as f:
        for r in topics:
            f.write(json.dumps({"text": r.payload, "topic": r.loc}) + "\n")
        f.write(json.dumps({"text": topics[0].payload}) + "\n")  # an exact duplicate
    return root


def config(out: Path, inputs: Path, **kw) -> PrepareConfig:
    base = dict(inputs=(str(inputs),), output=str(out), vocab_size=400, min_tokens=16, shard_tokens=50_000,
                workers=1, progress=False, val_fraction=0.1)
    return PrepareConfig(**(base | kw))


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "shards").iterdir())} | {
        "tokenizer.json": (out / "tokenizer.json").read_bytes()}


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref")
    run_prepare(config(out, corpus), log=lambda _: None)
    return out


def test_outputs_and_reader(reference):
    report = json.loads((reference / "report.json").read_text())
    assert {s["stage"] for s in report["stages"]} >= {"read", "normalize", "language", "exact_dup", "near_dup", "length"}
    assert report["duplicates"]["exact"] == 1
    assert report["duplicates"]["candidate_probability_at_threshold"] >= 0.99
    assert set(report["languages"]) == {"code", "en"}
    assert (reference / "lengths.png").read_bytes()[:4] == b"\x89PNG"
    drops = [json.loads(line) for line in (reference / "dropped.jsonl").read_text().splitlines()]
    dup = next(d for d in drops if d["reason"] == "exact_duplicate")
    assert dup["loc"] == "line 31" and dup["duplicate_of"].endswith("topics.jsonl:1")
    index = json.loads((reference / "shards" / "index.json").read_text())
    assert index["dtype"] == "uint16" and index["splits"]["train"]["documents"] > 10
    assert len(index["splits"]["train"]["shards"]) > 1  # small shards: documents cross boundaries
    tok = load_tokenizer(reference)
    ds = ShardDataset(reference / "shards", "train", seq_len=64, seed=0)
    x, y = ds.next_batch(4)
    assert x.shape == (4, 64) and (x[:, 1:] == y[:, :-1]).all() and x.max() < ds.vocab_size
    first, n = index["splits"]["train"]["offsets"][0], index["splits"]["train"]["counts"][0]
    ids = ds.read(first, first + n).tolist()
    assert ids[0] == tok.token_to_id(SPECIAL_TOKENS[0]) and ids[-1] == tok.token_to_id(SPECIAL_TOKENS[1])


def test_bad_inputs_are_counted_never_fatal(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    good = "Reasoning models write out their steps before the final answer, and this text is English. " * 4
    (src / "a_invalid.txt").write_bytes(b"caf\xe9 is not UTF-8 " * 20)
    (src / "b_empty.txt").write_text(" \n\t\n")
    (src / "c_dangling.txt").symlink_to(tmp_path / "nowhere.txt")  # listed, but cannot be opened
    (src / "d.jsonl").write_bytes(b"\n".join([
        json.dumps({"text": good}).encode(), b"{not json", json.dumps({"body": good}).encode(),
        json.dumps({"text": 3}).encode(), b'{"text": "caf\xe9"}', json.dumps({"text": good + " two"}).encode()]) + b"\n")
    pq.write_table(pa.table({"content": [good]}), src / "e_nocol.parquet")
    pq.write_table(pa.table({"text": [good + " three", None]}), src / "f_good.parquet")
    (src / "g_notparquet.parquet").write_bytes(b"PAR1 nonsense")
    (src / "h.bin").write_bytes(b"\x00\x01")
    out = tmp_path / "out"
    report = run_prepare(config(out, src, min_tokens=1, near_dup_threshold=1.0), log=lambda _: None)
    stages = {s["stage"]: s for s in report["stages"]}
    assert stages["read"]["reasons"] == {"unreadable": 2, "bad_json": 1, "missing_field": 3, "invalid_utf8": 1,
                                          "missing_column": 1, "unsupported_type": 1}
    assert stages["normalize"]["reasons"] == {"invalid_utf8": 1, "empty": 1}
    drops = [json.loads(line) for line in (out / "dropped.jsonl").read_text().splitlines()]
    where = {(Path(d["source"]).name, d["loc"], d["reason"]) for d in drops}
    assert ("d.jsonl", "line 2", "bad_json") in where and ("d.jsonl", "line 3", "missing_field") in where
    assert ("d.jsonl", "line 5", "invalid_utf8") in where and ("f_good.parquet", "row 1", "missing_field") in where
    assert ("c_dangling.txt", None, "unreadable") in where and ("e_nocol.parquet", None, "missing_column") in where
    assert report["shards"]["train"]["documents"] + report["shards"]["val"]["documents"] == 3


def test_deterministic_across_runs_and_workers(reference, corpus, tmp_path):
    run_prepare(config(tmp_path, corpus, workers=2), log=lambda _: None)  # a local process pool this time
    assert shard_bytes(tmp_path) == shard_bytes(reference)


def test_resume_after_interruption(reference, corpus, tmp_path, monkeypatch):
    def crash(run):
        raise KeyboardInterrupt("power cut during the length stage")

    monkeypatch.setitem(pipeline._STAGE_FUNCS, "length", crash)
    with pytest.raises(KeyboardInterrupt):
        run_prepare(config(tmp_path, corpus), log=lambda _: None)
    assert not (tmp_path / "shards").exists() and not (tmp_path / "work" / "length" / "stats.json").exists()
    assert not list((tmp_path / "work").rglob("*.tmp*"))  # nothing half-written left behind
    monkeypatch.undo()
    log: list[str] = []
    run_prepare(config(tmp_path, corpus), log=log.append)
    reused = [f"prepare: {s}: done earlier, reused" for s in ("clean", "dedup", "tokenizer")]
    assert [line for line in log if "reused" in line] == reused
    assert shard_bytes(tmp_path) == shard_bytes(reference)
    log.clear()
    run_prepare(config(tmp_path, corpus, min_tokens=17), log=log.append)  # a changed option reruns everything
    assert not any("reused" in line for line in log)


def test_resume_inside_the_shard_stage(reference, corpus, tmp_path, monkeypatch):
    real_flush, flushes = ShardWriter._flush, []

    def flaky_flush(self):
        flushes.append(self.split)
        if len(flushes) == 3:
            raise KeyboardInterrupt("crash while writing the third shard")
        real_flush(self)

    monkeypatch.setattr(ShardWriter, "_flush", flaky_flush)
    with pytest.raises(KeyboardInterrupt):
        run_prepare(config(tmp_path, corpus), log=lambda _: None)
    monkeypatch.undo()
    log: list[str] = []
    run_prepare(config(tmp_path, corpus), log=log.append)
    assert any("resuming after document" in line for line in log)
    stats = json.loads((tmp_path / "work" / "shards" / "stats.json").read_text())
    assert stats["resumed_at_document"] > 0
    assert shard_bytes(tmp_path) == shard_bytes(reference)
    assert not (tmp_path / "work" / "shards.tmp").exists()


@pytest.mark.slow
def test_dask_cluster_gives_the_local_result(reference, corpus, tmp_path):
    run_prepare(config(tmp_path, corpus, engine="dask", workers=2), log=lambda _: None)
    ids = lambda out: json.loads((out / "shards" / "index.json").read_text())["splits"]  # noqa: E731
    assert ids(tmp_path) == ids(reference)
    assert shard_bytes(tmp_path) == shard_bytes(reference)


def test_cli_end_to_end(corpus, tmp_path, capsys):
    from r1kit.cli import main

    out = tmp_path / "out"
    yaml_path = tmp_path / "prepare.yaml"
    yaml_path.write_text(f"prepare:\n  inputs: [{corpus}]\n  vocab_size: 400\n  min_tokens: 16\n", encoding="utf-8")
    rc = main(["prepare", "--config", str(yaml_path), "--output", str(out), "--workers", "1", "--no-progress",
               "--augment", "--val-fraction", "0.2"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "near_dup" in printed and "MB/s" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["augment"] and report["config"]["val_fraction"] == 0.2
    assert report["augmented"] > 0  # the pydoc topics hold numbers
    index = json.loads((out / "shards" / "index.json").read_text())
    train_ids, val_ids = set(index["splits"]["train"]["ids"]), set(index["splits"]["val"]["ids"])
    assert val_ids and not {i.removesuffix("#aug") for i in val_ids} & {i.removesuffix("#aug") for i in train_ids}
    # the shards hold exactly each document's text: originals and augmented copies alike
    texts = {d["id"]: d["text"] for d in map(json.loads, (out / "work" / "augment" / "docs.jsonl").read_text().splitlines())}
    tok, ds, train = load_tokenizer(out), ShardDataset(out / "shards", "train", 8), index["splits"]["train"]
    aug = [k for k, i in enumerate(train["ids"]) if i.endswith("#aug")]
    assert aug
    for k in aug[:3] + [0, len(train["ids"]) - 1]:
        ids = ds.read(train["offsets"][k], train["offsets"][k] + train["counts"][k]).tolist()
        assert tok.decode(ids[1:-1], skip_special_tokens=False) == texts[train["ids"][k]]
    assert main(["prepare", "--output", str(out), "--min-tokens", "9", "--max-tokens", "3"]) == 2
    assert "max_tokens" in capsys.readouterr().err
