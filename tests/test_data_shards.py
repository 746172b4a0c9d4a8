"""Shard writer/reader: what goes in comes out, across shard boundaries; resumable, seeded order."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from r1kit.data.records import write_json
from r1kit.data.shards import FORMAT, INDEX, ShardDataset, ShardWriter, dtype_for, split_of


def write_split(tmp, docs, shard_tokens, vocab_size=1000):
    dtype = dtype_for(vocab_size)
    writer = ShardWriter(tmp, "train", shard_tokens, dtype)
    for i, ids in enumerate(docs):
        writer.add(f"d{i}", np.asarray(ids, dtype=dtype))
    entry = writer.close()
    write_json(tmp / INDEX, {"format": FORMAT, "dtype": dtype.name, "vocab_size": vocab_size,
                             "splits": {"train": entry}})
    return entry


docs_strategy = st.lists(st.lists(st.integers(0, 999), min_size=0, max_size=40), min_size=1, max_size=30)


@settings(max_examples=60, deadline=None)
@given(docs=docs_strategy, shard_tokens=st.integers(1, 50), seq_len=st.integers(1, 17))
def test_roundtrip_across_shard_boundaries(tmp_path_factory, docs, shard_tokens, seq_len):
    tmp = tmp_path_factory.mktemp("shards")
    entry = write_split(tmp, docs, shard_tokens)
    stream = np.asarray([t for d in docs for t in d], dtype=np.int64)
    assert entry["tokens"] == stream.size
    assert all(s["tokens"] == shard_tokens for s in entry["shards"][:-1])  # only the last shard is partial
    ds = ShardDataset(tmp, "train", seq_len=seq_len, shuffle=False)
    assert ds.read(0, ds.tokens).tolist() == stream.tolist()
    for doc_ids, offset, count in zip(docs, entry["offsets"], entry["counts"]):
        assert ds.read(offset, offset + count).tolist() == doc_ids
    assert len(ds) == max(0, (stream.size - 1) // seq_len)
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.tolist() == stream[i * seq_len:(i + 1) * seq_len].tolist()
        assert y.tolist() == stream[i * seq_len + 1:(i + 1) * seq_len + 1].tolist()


def test_dtype_follows_vocabulary(tmp_path):
    assert dtype_for(65536) == np.uint16 and dtype_for(65537) == np.uint32
    write_split(tmp_path, [[70000, 1, 2]], 2, vocab_size=70001)
    assert ShardDataset(tmp_path, "train", 1).read(0, 3).tolist() == [70000, 1, 2]
    with pytest.raises(ValueError, match="does not fit"):
        ShardWriter(tmp_path, "x", 4, dtype_for(100)).add("a", np.asarray([70000]))


def test_shuffle_is_seeded_and_resumable(tmp_path):
    write_split(tmp_path, [list(range(i, i + 37)) for i in range(0, 900, 37)], 100)
    a = ShardDataset(tmp_path, "train", seq_len=8, seed=3)
    first = [x.tolist() for x, _ in (next(iter(a)) for _ in range(5))]
    state = a.state_dict()
    rest = a.next_batch(60)[0].tolist()  # runs past the end of epoch 0 into epoch 1
    b = ShardDataset(tmp_path, "train", seq_len=8, seed=3)
    assert [x.tolist() for x, _ in (next(iter(b)) for _ in range(5))] == first  # same seed, same order
    c = ShardDataset(tmp_path, "train", seq_len=8, seed=3)
    c.load_state_dict(state)
    assert c.next_batch(60)[0].tolist() == rest
    assert sorted(a.order(0).tolist()) == list(range(len(a)))
    assert a.order(0).tolist() != ShardDataset(tmp_path, "train", seq_len=8, seed=4).order(0).tolist()
    with pytest.raises(ValueError, match="seq_len"):
        ShardDataset(tmp_path, "train", seq_len=9, seed=3).load_state_dict(state)


def test_missing_index_is_a_clear_error(tmp_path):
    from r1kit.errors import CheckpointError

    with pytest.raises(CheckpointError, match="r1kit prepare"):
        ShardDataset(tmp_path, "train", 8)


def test_split_by_document_is_stable():
    ids = [f"doc{i}" for i in range(2000)]
    splits = [split_of(i, 0, 0.1) for i in ids]
    assert splits == [split_of(i, 0, 0.1) for i in ids]
    assert 120 < splits.count("val") < 280
    assert all(split_of(i, 0, 0.0) == "train" for i in ids)
