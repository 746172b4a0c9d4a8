"""`r1kit prepare` end to end: run the stages in order, resume finished ones, write the report.

Each stage reads the previous stage's file in ``<output>/work/<stage>/`` and writes its own there,
with ``stats.json`` last as the mark that it finished (it carries the run's fingerprint: config +
inputs). A re-run skips every finished stage whose fingerprint matches, so an interrupted run
resumes at the stage it was in (the shard stage at its last completed shard). This module must
never write a final file in place: every file is written under a temporary name and renamed, and
the shard folder appears whole or not at all.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import os
import shutil
import sys
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from r1kit.data import dedup, length, readers
from r1kit.data.augment import augment
from r1kit.data.clean import clean_chunk
from r1kit.data.config import PrepareConfig
from r1kit.data.engine import Engine, make_engine
from r1kit.data.records import (Doc, Drop, JsonlWriter, TokenWriter, iter_docs, iter_token_ids, read_at, read_json,
                                write_json)
from r1kit.data.report import write_report
from r1kit.data.shards import FORMAT, INDEX, SPLITS, ShardCheckpoint, ShardWriter, dtype_for, split_of
from r1kit.errors import ConfigError, R1kitError
from r1kit.tokenizer import BOS, EOS, encode_chunk, load_tokenizer, train_tokenizer, with_special_tokens

STAGES = ("clean", "dedup", "tokenizer", "length", "augment", "shards")
CLEAN_STAGES = ("read", "normalize", "language")
CHUNK_BYTES = 4 << 20  # a chunk also closes at 4 MiB, so one huge file never stalls a worker long
# Stages that drop documents: each must keep at least one, or the corpus is empty from there on.
FILTER_STAGES = ("clean", "dedup", "length")
# What to change when one drop reason removed the most documents of a stage that kept none.
_EMPTY_HINTS = {
    "unsupported_type": "add the files' extension to --text-extensions or --code-extensions",
    "missing_field": "set --text-field to the field that holds the text",
    "missing_column": "set --text-field to the column that holds the text",
    "special_file": "pass regular files or folders of them",
    "unreadable": "check that the files exist and can be read",
    "language": "add the corpus' language to --languages or lower --language-threshold",
    "too_short": "lower --min-tokens",
    "too_long": "raise --max-tokens",
}


class EmptyCorpusError(R1kitError):
    """Every document was dropped (or none was found): there is nothing to train on."""


class Run:
    """The state one ``prepare`` run shares between its stages."""

    def __init__(self, cfg: PrepareConfig, engine: Engine | None = None, log: Callable[[str], None] = print):
        self.cfg, self.log = cfg, log
        self.out = Path(cfg.output)
        self.work = self.out / "work"
        self.fingerprint = _fingerprint(cfg)
        self._engine, self._own_engine = engine, engine is None

    @property
    def engine(self) -> Engine:
        # started only when a stage needs it: a fully resumed run never starts a cluster
        if self._engine is None:
            self._engine = make_engine(self.cfg.engine, self.cfg.workers, self.cfg.dask_address)
        return self._engine

    def close(self) -> None:
        if self._own_engine and self._engine is not None:
            self._engine.close()

    def dir(self, stage: str) -> Path:
        return self.work / stage

    def docs(self, stage: str) -> Path:
        return self.dir(stage) / "docs.jsonl"

    @property
    def tokenizer_path(self) -> Path:
        return self.out / "tokenizer.json"

    def progress(self, items: Iterable[Any], desc: str, unit: str = "chunk") -> Iterable[Any]:
        if not self.cfg.progress:
            return items
        from tqdm import tqdm

        return tqdm(items, desc=desc, unit=unit, file=sys.stderr, leave=False)


def run_prepare(cfg: PrepareConfig, engine: Engine | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) the pipeline; returns the report, also written to ``<output>/report.json``."""
    _preflight(cfg)
    run = Run(cfg, engine, log)
    try:
        rerun_rest = False
        for stage in STAGES:
            stats_path = run.dir(stage) / "stats.json"
            if not rerun_rest and _finished(stats_path, run.fingerprint):
                log(f"prepare: {stage}: done earlier, reused")
                continue
            rerun_rest = True  # a stage that runs again invalidates everything after it
            for leftover in run.dir(stage).glob(".*.tmp-*"):  # from a run killed too hard to clean up
                leftover.unlink()
            started = time.perf_counter()
            stats = _STAGE_FUNCS[stage](run)
            if stage in FILTER_STAGES and not stats["kept"]:
                raise EmptyCorpusError(_empty_message(run, stage, stats))
            stats.update(stage=stage, fingerprint=run.fingerprint, seconds=round(time.perf_counter() - started, 3))
            write_json(stats_path, stats)
            log(f"prepare: {stage}: {_summary(stats)}")
        return write_report(run.out, cfg, run.fingerprint, [read_json(run.dir(s) / "stats.json") for s in STAGES],
                            [run.dir(s) / "drops.jsonl" for s in STAGES])
    finally:
        run.close()


def _preflight(cfg: PrepareConfig) -> None:
    """Fail now on what would otherwise fail only after the long clean and dedup passes."""
    if Path(cfg.output).exists() and not Path(cfg.output).is_dir():
        raise ConfigError(f"--output {cfg.output!r} exists and is not a folder: move it away or choose another --output")
    if cfg.tokenizer:
        load_tokenizer(cfg.tokenizer)  # raises, naming the path, when it is missing or not a tokenizer.json


def _finished(stats_path: Path, fingerprint: str) -> bool:
    """Whether a stage finished for this fingerprint; an unreadable mark (a dead disk) means run it again."""
    try:
        return read_json(stats_path).get("fingerprint") == fingerprint
    except (OSError, ValueError, AttributeError):
        return False


def _empty_message(run: Run, stage: str, stats: dict[str, Any]) -> str:
    """Which stage dropped everything, for which reasons, and what to change."""
    if not stats["in"]:
        where = ", ".join(run.cfg.inputs) or "the embedded corpus"
        return f"no documents found in {where}: pass files or folders holding .txt/.md/code, .jsonl or .parquet"
    reasons = collections.Counter()
    for sub, counter in stats.get("substages", {}).items():
        reasons.update({(sub, reason): n for reason, n in counter["dropped"].items()})
    why = ", ".join(f"{sub}/{reason}: {n}" for (sub, reason), n in reasons.most_common())
    (_, top), _ = reasons.most_common(1)[0]
    hint = _EMPTY_HINTS.get(top, "check the inputs and the options of that stage")
    if top == "too_short":
        hint += f" (it is {run.cfg.min_tokens})"
    count = f"{stats['in']} document" + ("s" if stats["in"] > 1 else "")
    return (f"the {stage} stage dropped all {count} ({why}), so there is nothing to train on; "
            f"{hint}. Every dropped document and why: {run.dir(stage) / 'drops.jsonl'}")


def _summary(stats: dict[str, Any]) -> str:
    return f"{stats.get('in', 0)} in, {stats.get('kept', 0)} kept ({stats['seconds']:.1f} s)"


def _fingerprint(cfg: PrepareConfig) -> str:
    """Config + what the inputs are (path, size, modification time): a change in either reruns all."""
    h = hashlib.sha256(cfg.fingerprint().encode())
    if cfg.inputs:
        for path in readers.list_files(cfg.inputs, exclude=cfg.output):
            try:
                st = os.stat(path)
                h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            except OSError:
                h.update(f"{path}\0unreadable\n".encode())
    else:
        h.update(f"embedded:{sys.version}".encode())
    return h.hexdigest()[:16]


def _chunks(items: Iterable[Any], size: int, weight: Callable[[Any], int] = lambda _: 0) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    weight_sum = 0
    for item in items:
        chunk.append(item)
        weight_sum += weight(item)
        if len(chunk) >= size or weight_sum >= CHUNK_BYTES:
            yield chunk
            chunk, weight_sum = [], 0
    if chunk:
        yield chunk


def _counter(stats: dict[str, Any], stage: str) -> dict[str, Any]:
    return stats.setdefault("substages", {}).setdefault(stage, {"in": 0, "kept": 0, "dropped": {}})


def _drop(counter: dict[str, Any], drops: JsonlWriter, drop: Drop) -> None:
    counter["dropped"][drop.reason] = counter["dropped"].get(drop.reason, 0) + 1
    drops.write(drop)


# --- stages -------------------------------------------------------------------------------------

def _clean(run: Run) -> dict[str, Any]:
    """Read, normalize, filter languages: one streaming pass, cleaning in workers."""
    cfg = run.cfg
    stats: dict[str, Any] = {"bytes": 0}
    counters = {s: _counter(stats, s) for s in CLEAN_STAGES}
    raw = readers.iter_inputs(cfg.inputs, cfg.text_field, cfg.text_extensions, cfg.code_extensions, cfg.output)

    def sized(item: Any) -> int:
        size = len(item.payload) if isinstance(item, readers.RawDoc) else 0
        stats["bytes"] += size
        return size

    chunks = _chunks(raw, cfg.chunk_docs, sized)
    with JsonlWriter(run.docs("clean")) as docs, JsonlWriter(run.dir("clean") / "drops.jsonl") as drops:
        results = run.engine.map(clean_chunk, chunks, cfg.languages, cfg.language_threshold, cfg.language_sample_chars)
        for item in run.progress((r for chunk in results for r in chunk), "clean", "doc"):
            # a document dropped at one sub-stage passed the ones before it
            last = CLEAN_STAGES.index(item.stage) if isinstance(item, Drop) else len(CLEAN_STAGES)
            for s in CLEAN_STAGES[:last]:
                counters[s]["in"] += 1
                counters[s]["kept"] += 1
            if isinstance(item, Drop):
                counters[item.stage]["in"] += 1
                _drop(counters[item.stage], drops, item)
            else:
                docs.write(item)
    stats["in"], stats["kept"] = counters["read"]["in"], counters["language"]["kept"]
    return stats


def _dedup(run: Run) -> dict[str, Any]:
    """Exact duplicates by content hash, then near-duplicates by MinHash/LSH verified exactly."""
    cfg = run.cfg
    stats: dict[str, Any] = {"bytes": 0}
    exact, near = _counter(stats, dedup.EXACT), _counter(stats, dedup.NEAR)
    offsets: dict[int, int] = {}  # position -> byte offset in the clean file, for kept documents
    seen: dict[bytes, str] = {}  # content hash -> id of the first document with it
    queue: collections.deque = collections.deque()

    def shingles_of(doc: Doc) -> set[str]:
        return dedup.shingles(doc.text, cfg.shingle, cfg.shingle_size)

    with open(run.docs("clean"), "rb") as lines, open(run.docs("clean"), "rb") as source, \
            JsonlWriter(run.docs("dedup")) as docs, JsonlWriter(run.dir("dedup") / "drops.jsonl") as drops:
        index = dedup.NearDupIndex(cfg.minhash_bands, cfg.minhash_rows, cfg.near_dup_threshold,
                                   lru_cache(maxsize=1024)(lambda position: shingles_of(read_at(source, offsets[position]))))

        def unique_docs() -> Iterator[tuple[int, int, Doc]]:
            offset = 0
            for position, line in enumerate(lines):
                doc = Doc.from_json(line)
                stats["bytes"] += len(line)
                exact["in"] += 1
                key = dedup.exact_key(doc.text)
                if key in seen:
                    _drop(exact, drops, Drop(doc.id, doc.source, doc.loc, dedup.EXACT, "exact_duplicate",
                                             "same content hash", duplicate_of=seen[key]))
                else:
                    seen[key] = doc.id
                    exact["kept"] += 1
                    yield position, offset, doc
                offset += len(line)

        def text_chunks() -> Iterator[list[str]]:
            for chunk in _chunks(unique_docs(), cfg.chunk_docs, lambda item: len(item[2].text)):
                queue.append(chunk)
                yield [doc.text for _, _, doc in chunk]

        num_perm = cfg.minhash_bands * cfg.minhash_rows
        signatures = run.engine.map(dedup.signature_chunk, text_chunks(), num_perm, cfg.shingle, cfg.shingle_size)
        for sigs in run.progress(signatures, "dedup"):
            for (position, offset, doc), sig in zip(queue.popleft(), sigs):
                near["in"] += 1
                hit = index.match(sig, lambda d=doc: shingles_of(d))
                if hit is not None:
                    original = read_at(source, offsets[hit[0]])
                    _drop(near, drops, Drop(doc.id, doc.source, doc.loc, dedup.NEAR, "near_duplicate",
                                            f"Jaccard {hit[1]:.3f} >= {cfg.near_dup_threshold}", duplicate_of=original.id))
                    continue
                offsets[position] = offset
                index.add(position, sig)
                near["kept"] += 1
                docs.write(doc)
    stats.update({"in": exact["in"], "kept": near["kept"], "candidates_checked": index.candidates_checked,
                  "bands": cfg.minhash_bands, "rows": cfg.minhash_rows})
    return stats


def _tokenizer(run: Run) -> dict[str, Any]:
    """Train the byte-level BPE on the deduplicated corpus, or adopt an existing tokenizer.json."""
    cfg = run.cfg
    stats: dict[str, Any] = {"bytes": 0, "in": 0}
    if cfg.tokenizer:
        tok = with_special_tokens(load_tokenizer(cfg.tokenizer))
        stats["source"] = cfg.tokenizer
    else:
        def texts() -> Iterator[str]:
            for doc in iter_docs(run.docs("dedup")):
                if stats["bytes"] >= cfg.tokenizer_train_bytes:
                    return
                stats["bytes"] += len(doc.text.encode("utf-8"))
                stats["in"] += 1
                yield doc.text

        tok = train_tokenizer(texts(), cfg.vocab_size)
        stats["source"] = "trained"
    tmp = run.tokenizer_path.with_name(".tokenizer.json.tmp")
    run.out.mkdir(parents=True, exist_ok=True)
    tok.save(str(tmp))
    tmp.replace(run.tokenizer_path)
    stats.update(kept=stats["in"], vocab_size=tok.get_vocab_size(with_added_tokens=True))
    return stats


def _length(run: Run) -> dict[str, Any]:
    """Drop documents outside [min_tokens, max_tokens] tokens; keep the kept ones' ids for the shards."""
    cfg = run.cfg
    stats: dict[str, Any] = {"bytes": 0}
    counter = _counter(stats, length.STAGE)
    kept_lengths: list[int] = []
    queue: collections.deque = collections.deque()

    def text_chunks() -> Iterator[list[str]]:
        for chunk in _chunks(iter_docs(run.docs("dedup")), cfg.chunk_docs, lambda d: len(d.text)):
            queue.append(chunk)
            stats["bytes"] += sum(len(d.text.encode("utf-8")) for d in chunk)
            yield [d.text for d in chunk]

    with JsonlWriter(run.docs("length")) as docs, JsonlWriter(run.dir("length") / "drops.jsonl") as drops, \
            TokenWriter(run.dir("length")) as tokens:
        encoded = run.engine.map(encode_chunk, text_chunks(), str(run.tokenizer_path))
        for chunk_ids in run.progress(encoded, "length"):
            for doc, ids in zip(queue.popleft(), chunk_ids):
                counter["in"] += 1
                reason = length.verdict(ids.size, cfg.min_tokens, cfg.max_tokens)
                if reason:
                    _drop(counter, drops, Drop(doc.id, doc.source, doc.loc, length.STAGE, reason,
                                               f"{ids.size} tokens outside [{cfg.min_tokens}, {cfg.max_tokens}]"))
                else:
                    counter["kept"] += 1
                    kept_lengths.append(int(ids.size))
                    docs.write(doc)
                    tokens.write(ids)
    stats.update({"in": counter["in"], "kept": counter["kept"], "lengths": length.summary(kept_lengths)})
    return stats


def _augment(run: Run) -> dict[str, Any]:
    """Add marked, augmented copies of text documents (when enabled; otherwise pass through).

    Originals keep the ids the length stage computed; only the copies are encoded.
    """
    cfg = run.cfg
    stats: dict[str, Any] = {"bytes": 0, "in": 0, "added": 0, "enabled": cfg.augment}
    originals = zip(iter_docs(run.docs("length")), iter_token_ids(run.dir("length")))
    queue: collections.deque = collections.deque()

    def copy_chunks() -> Iterator[list[str]]:
        for chunk in _chunks(originals, cfg.chunk_docs, lambda item: len(item[0].text)):
            copies = [augment(doc, cfg.synonyms, cfg.synonym_probability, cfg.number_scale, cfg.seed) if cfg.augment
                      else None for doc, _ in chunk]
            queue.append((chunk, copies))
            yield [c.text for c in copies if c is not None]

    with JsonlWriter(run.docs("augment")) as docs, JsonlWriter(run.dir("augment") / "drops.jsonl"), \
            TokenWriter(run.dir("augment")) as tokens:
        # with augmentation off there is nothing to encode: no need to start workers for it
        encoded_copies = (run.engine.map(encode_chunk, copy_chunks(), str(run.tokenizer_path)) if cfg.augment
                          else ([] for _ in copy_chunks()))
        for encoded in run.progress(encoded_copies, "augment"):
            chunk, copies = queue.popleft()
            copy_ids = iter(encoded)
            for (doc, ids), copy in zip(chunk, copies):
                stats["in"] += 1
                stats["bytes"] += len(doc.text.encode("utf-8"))
                docs.write(doc)
                tokens.write(ids)
                if copy is not None:
                    docs.write(copy)
                    tokens.write(next(copy_ids))
                    stats["added"] += 1
    stats["kept"] = stats["in"] + stats["added"]
    return stats


def _shards(run: Run) -> dict[str, Any]:
    """Frame each document as <|bos|> ids <|eos|>, split by document, pack into shards.

    After every full shard a checkpoint records how many documents are in, each split's index so
    far and its partial shard, so an interrupted stage resumes at the last completed shard.
    """
    cfg = run.cfg
    tok = load_tokenizer(run.tokenizer_path)
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    dtype = dtype_for(vocab_size)
    tmp_dir = run.work / "shards.tmp"
    writers = {s: ShardWriter(tmp_dir, s, cfg.shard_tokens, dtype) for s in SPLITS}
    stats: dict[str, Any] = {"bytes": 0, "in": 0, "resumed_at_document": 0}
    mix: dict[str, dict[str, int]] = {}
    checkpoint = ShardCheckpoint(tmp_dir, run.fingerprint)
    saved = checkpoint.load(writers)
    if saved is not None:
        stats, mix = saved["stats"], saved["mix"]
        stats["resumed_at_document"] = stats["in"]
        run.log(f"prepare: shards: resuming after document {stats['in']} (shard checkpoint)")
    done = stats["in"]
    todo = zip(itertools.islice(iter_docs(run.docs("augment")), done, None), iter_token_ids(run.dir("augment"), done))
    for doc, ids in run.progress(todo, "shards", "doc"):
        stats["in"] += 1
        stats["bytes"] += len(doc.text.encode("utf-8"))
        # an augmented copy goes where its original went, so validation never sees a variant of training text
        split = split_of(doc.id.removesuffix("#aug") if doc.augmented else doc.id, cfg.seed, cfg.val_fraction)
        shards_before = len(writers[split].shards)
        writers[split].add(doc.id, np.concatenate(([bos], ids, [eos])).astype(dtype))
        lang = mix.setdefault(doc.lang or "und", {"documents": 0, "tokens": 0})
        lang["documents"] += 1
        lang["tokens"] += int(ids.size)
        if len(writers[split].shards) > shards_before:
            checkpoint.save(writers, {"stats": stats, "mix": mix})
    index = {"format": FORMAT, "dtype": dtype.name, "vocab_size": vocab_size, "bos_id": bos, "eos_id": eos,
             "tokenizer": "../tokenizer.json", "seed": cfg.seed, "val_fraction": cfg.val_fraction,
             "splits": {s: w.close() for s, w in writers.items()}}
    _check_splits(run, index["splits"])
    checkpoint.clear()
    write_json(tmp_dir / INDEX, index)
    final = run.out / "shards"
    shutil.rmtree(final, ignore_errors=True)
    tmp_dir.replace(final)
    splits = {s: {"tokens": e["tokens"], "documents": e["documents"], "shards": len(e["shards"])}
              for s, e in index["splits"].items()}
    stats.update(kept=stats["in"], dtype=dtype.name, vocab_size=vocab_size, languages=mix, splits=splits)
    return stats


def _check_splits(run: Run, splits: dict[str, dict[str, Any]]) -> None:
    """An empty train split is an error; an empty val split only a warning (training says what to do)."""
    total = sum(e["documents"] for e in splits.values())
    if not splits["train"]["documents"]:
        raise EmptyCorpusError(
            f"all {total} documents went to the val split (val_fraction={run.cfg.val_fraction}), none to train: "
            "lower --val-fraction or add documents"
        )
    if not splits["val"]["documents"] and run.cfg.val_fraction:
        run.log(f"prepare: warning: none of the {total} documents went to the val split (val_fraction="
                f"{run.cfg.val_fraction}); training will need train.eval_every: 0, or raise --val-fraction")


_STAGE_FUNCS: dict[str, Callable[[Run], dict[str, Any]]] = {
    "clean": _clean, "dedup": _dedup, "tokenizer": _tokenizer, "length": _length, "augment": _augment,
    "shards": _shards,
}
