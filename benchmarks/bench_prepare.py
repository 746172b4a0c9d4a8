"""Benchmark `r1kit prepare`: documents/s and MB/s per stage, and near-duplicate recall/precision
beside a plain single-process datasketch baseline, on the embedded corpus and a larger generated one.

    python benchmarks/bench_prepare.py [--docs 6000] [--workers 0] [--out /tmp/r1kit-bench]

The generated corpus is built from the standard library (random windows of modules, random
paragraphs of pydoc topics), with planted near-duplicates whose true Jaccard similarity is measured
exactly; recall counts planted pairs >= 0.95 that were removed, precision the share of removals
whose true Jaccard with the document they duplicate is >= 0.95.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import time
from pathlib import Path

from r1kit.data import dedup
from r1kit.data.config import PrepareConfig
from r1kit.data.pipeline import run_prepare
from r1kit.data.readers import RawDoc, iter_embedded

THRESHOLD = 0.95
_IDENT = re.compile(r"[A-Za-z_][A-Za-z_0-9]*")


def generate(root: Path, n_docs: int, seed: int = 0) -> dict[str, tuple[str, float]]:
    """Write ``n_docs`` base documents plus planted variants; returns {variant: (original, true J)}."""
    rng = random.Random(seed)
    raws = [r for r in iter_embedded() if isinstance(r, RawDoc)]
    modules = [r.payload.decode("utf-8").splitlines() for r in raws if r.kind == "code"]
    modules = [m for m in modules if len(m) > 60]
    paragraphs = [p for r in raws if r.kind == "text" for p in r.payload.split("\n\n") if len(p) > 200]
    root.mkdir(parents=True)
    truth: dict[str, tuple[str, float]] = {}
    for k in range(n_docs):
        if k % 4 == 3:
            text, ext = "\n\n".join(rng.sample(paragraphs, 8)), ".txt"
        else:
            parts = []
            for _ in range(3):
                lines = rng.choice(modules)
                start = rng.randrange(len(lines) - 50)
                parts.append("\n".join(lines[start:start + 50]))
            text, ext = f"# generated document {k}\n" + "\n".join(parts), ".py"
        name = root / f"{k:06d}_0{ext}"
        name.write_text(text, encoding="utf-8")
        if k % 5 == 0:  # a planted variant: edit a random share of identifiers, then measure its Jaccard
            spots = list(_IDENT.finditer(text))
            edits = sorted(rng.sample(range(len(spots)), int(len(spots) * rng.uniform(0.0, 0.012))))
            out, last = [], 0
            for n, i in enumerate(edits):
                out += [text[last:spots[i].start()], f"edit{n}x"]
                last = spots[i].end()
            variant = "".join(out + [text[last:]]) + "\n"
            vname = root / f"{k:06d}_1{ext}"
            vname.write_text(variant, encoding="utf-8")
            truth[str(vname)] = (str(name), dedup.jaccard(dedup.shingles(text), dedup.shingles(variant)))
    return truth


def score(drops: dict[str, str], truth: dict[str, tuple[str, float]], texts: dict[str, str]) -> tuple[float, float]:
    """(recall on planted pairs >= threshold, precision of all near-duplicate removals)."""
    planted = [v for v, (_, j) in truth.items() if j >= THRESHOLD]
    recall = sum(v in drops for v in planted) / max(1, len(planted))
    right = sum(dedup.jaccard(dedup.shingles(texts[d]), dedup.shingles(texts[k])) >= THRESHOLD for d, k in drops.items())
    return recall, right / max(1, len(drops))


def baseline(texts: dict[str, str]) -> tuple[dict[str, str], float]:
    """What a plain datasketch user writes: MinHashLSH(threshold=0.95, num_perm=128), no verification."""
    from datasketch import MinHash, MinHashLSH

    start = time.perf_counter()
    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=128)
    drops: dict[str, str] = {}
    seen: set[bytes] = set()
    for key, text in texts.items():
        h = dedup.exact_key(text)
        if h in seen:
            continue
        seen.add(h)
        m = MinHash(num_perm=128)
        m.update_batch([s.encode() for s in dedup.shingles(text)])
        hits = lsh.query(m)
        if hits:
            drops[key] = min(hits)
        else:
            lsh.insert(key, m)
    return drops, time.perf_counter() - start


def run(name: str, cfg: PrepareConfig, truth: dict[str, tuple[str, float]] | None) -> None:
    shutil.rmtree(cfg.output, ignore_errors=True)
    start = time.perf_counter()
    report = run_prepare(cfg, log=lambda _: None)
    total = time.perf_counter() - start
    print(f"\n## {name}: {total:.1f} s end to end, workers={cfg.workers or 'all cores'}")
    print(f"{'stage':<11}{'docs':>8}{'MB':>8}{'s':>8}{'docs/s':>10}{'MB/s':>8}")
    for t in report["throughput"]:
        print(f"{t['stage']:<11}{t['documents']:>8}{t['MB']:>8.1f}{t['seconds']:>8.2f}"
              f"{t['docs_per_s']:>10.1f}{t['MB_per_s']:>8.2f}")
    if truth is None:
        return
    texts = {p: Path(p).read_text(encoding="utf-8") for p in sorted(map(str, Path(cfg.inputs[0]).iterdir()))}
    drops = {d["id"]: d["duplicate_of"] for d in map(json.loads, open(Path(cfg.output) / "dropped.jsonl"))
             if d["stage"] == "near_dup"}
    ours = next(t for t in report["throughput"] if t["stage"] == "dedup")
    base_drops, base_s = baseline(texts)
    mb = sum(len(t.encode()) for t in texts.values()) / 1e6
    r_ours, p_ours = score(drops, truth, texts)
    r_base, p_base = score(base_drops, truth, texts)
    planted = sum(j >= THRESHOLD for _, j in truth.values())
    print(f"\nnear-duplicates ({planted} planted pairs with J >= {THRESHOLD}, {len(truth) - planted} below)")
    print(f"{'method':<46}{'docs/s':>9}{'MB/s':>8}{'recall':>8}{'precision':>10}")
    rows = [("r1kit dedup pass (14x8 LSH + exact Jaccard)", ours["docs_per_s"], ours["MB_per_s"], r_ours, p_ours),
            ("datasketch MinHashLSH(threshold=0.95), 1 proc", len(texts) / base_s, mb / base_s, r_base, p_base)]
    for label, docs_s, mb_s, recall, precision in rows:
        print(f"{label:<46}{docs_s:>9.1f}{mb_s:>8.2f}{recall:>8.3f}{precision:>10.3f}")
    print(f"ratio r1kit/baseline: speed {rows[0][1] / rows[1][1]:.2f}x, recall {r_ours / max(r_base, 1e-9):.2f}x, "
          f"precision {p_ours / max(p_base, 1e-9):.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=6000, help="base documents in the generated corpus")
    parser.add_argument("--workers", type=int, default=0, help="worker processes (0 = all cores)")
    parser.add_argument("--out", default="/tmp/r1kit-bench")
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    embedded = PrepareConfig(output=str(out / "embedded"), workers=args.workers, progress=False)
    run("embedded corpus (stdlib + pydoc topics)", embedded, None)
    truth = generate(out / "generated-input", args.docs)
    cfg = PrepareConfig(inputs=(str(out / "generated-input"),), output=str(out / "generated"), workers=args.workers,
                        min_tokens=64, progress=False)
    run(f"generated corpus ({args.docs} documents + {len(truth)} planted variants)", cfg, truth)


if __name__ == "__main__":
    main()
