"""The dedup stage of `r1kit prepare`: exact (content hash), then near-duplicates (MinHash + LSH + exact Jaccard).

LSH only proposes candidates; a document is dropped only when its true Jaccard similarity with an
earlier kept document, computed on the full shingle sets, reaches the threshold. Bands x rows are
chosen so that a pair at the threshold becomes a candidate with probability >= 0.99 (see
``candidate_probability`` and docs/data.md). This module must never drop a document on an estimate.
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache
from typing import Callable

import numpy as np
import xxhash

EXACT, NEAR = "exact_dup", "near_dup"
MINHASH_SEED = 1  # fixed: signatures must be comparable across runs and workers
MINHASH_SCHEME = "affine32"  # datasketch >= 2 default; named so stored signatures stay readable
# A "word" is a run of letters/digits, except that each CJK character is a word of its own
# (Chinese has no spaces, so whitespace words would make a whole sentence one shingle).
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_WORDS = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+")


def exact_key(text: str) -> bytes:
    """Content hash for exact deduplication."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def shingles(text: str, kind: str = "word", size: int = 5) -> set[str]:
    """The shingle set of a text: lower-cased word n-grams (``word``) or character n-grams (``char``)."""
    if kind == "word":
        units: list[str] | str = _WORDS.findall(text.lower())
        join = " ".join
    else:
        units = " ".join(text.lower().split())
        join = "".join
    if len(units) <= size:
        return {join(units)} if units else set()
    return set(map(join, zip(*(units[i:] for i in range(size)))))  # n-gram windows, built in C


def jaccard(a: set[str], b: set[str]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def candidate_probability(j: float, bands: int, rows: int) -> float:
    """Probability that LSH with ``bands`` x ``rows`` proposes a pair of Jaccard similarity ``j``."""
    return 1.0 - (1.0 - j ** rows) ** bands


@lru_cache(maxsize=4)
def _template(num_perm: int):
    from datasketch import MinHash

    return MinHash(num_perm=num_perm, seed=MINHASH_SEED, scheme=MINHASH_SCHEME, hashfunc=xxhash.xxh32_intdigest)


def signature_chunk(texts: list[str], num_perm: int, shingle: str, size: int) -> list[np.ndarray]:
    """MinHash signatures (``num_perm`` uint64 values) of a chunk of texts; a worker task."""
    from datasketch import MinHash

    template = _template(num_perm)
    out = []
    for text in texts:
        # xxh32 as the base hash: much cheaper than datasketch's default sha1, and as well mixed (docs/data.md)
        m = MinHash(num_perm=num_perm, seed=MINHASH_SEED, permutations=template.permutations, scheme=MINHASH_SCHEME,
                    hashfunc=xxhash.xxh32_intdigest)
        m.update_batch([s.encode("utf-8") for s in shingles(text, shingle, size)])
        out.append(m.hashvalues)
    return out


class NearDupIndex:
    """Documents kept so far, indexed by LSH; ``match`` finds the kept one a new document duplicates.

    Keys are the documents' positions in input order; ``load`` returns the shingle set of a kept
    document by key (the caller reads it back from disk, so the index holds signatures, never texts).
    """

    def __init__(self, bands: int, rows: int, threshold: float, load: Callable[[int], set[str]]):
        from datasketch import MinHashLSH

        self.num_perm, self.threshold, self.load = bands * rows, threshold, load
        self.lsh = MinHashLSH(num_perm=self.num_perm, params=(bands, rows))
        self.candidates_checked = 0

    def match(self, signature: np.ndarray, own: Callable[[], set[str]]) -> tuple[int, float] | None:
        """The earliest kept document whose exact Jaccard with ``own()`` reaches the threshold.

        ``own`` is called only when LSH proposes candidates: most documents have none.
        """
        from datasketch import LeanMinHash

        found = self.lsh.query(LeanMinHash(seed=MINHASH_SEED, hashvalues=signature, scheme=MINHASH_SCHEME))
        mine = own() if found else set()
        for key in sorted(found):  # earliest first: the first of a group is the one kept
            self.candidates_checked += 1
            j = jaccard(mine, self.load(key))
            if j >= self.threshold:
                return key, j
        return None

    def add(self, key: int, signature: np.ndarray) -> None:
        from datasketch import LeanMinHash

        self.lsh.insert(key, LeanMinHash(seed=MINHASH_SEED, hashvalues=signature, scheme=MINHASH_SCHEME), check_duplication=False)

