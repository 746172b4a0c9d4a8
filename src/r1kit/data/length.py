"""The length stage of `r1kit prepare`: keep documents whose token count lies in [min_tokens, max_tokens].

Counting runs in workers (:func:`r1kit.tokenizer.encode_chunk`); this module decides and summarises the
lengths for the report. It must never count with anything but the project tokenizer.
"""

from __future__ import annotations

from typing import Any

import numpy as np

STAGE = "length"


def verdict(count: int, min_tokens: int, max_tokens: int) -> str | None:
    """None when the length is kept, else the reason to drop."""
    if count < min_tokens:
        return "too_short"
    if count > max_tokens:
        return "too_long"
    return None


def summary(counts: list[int], bins: int = 40) -> dict[str, Any]:
    """Count, range, mean, percentiles and a log-spaced histogram of token lengths."""
    if not counts:
        return {"count": 0}
    a = np.asarray(counts, dtype=np.int64)
    edges = np.unique(np.geomspace(max(1, a.min()), max(2, a.max() + 1), bins + 1).round().astype(np.int64))
    hist, edges = np.histogram(a, bins=edges)
    return {
        "count": int(a.size), "min": int(a.min()), "max": int(a.max()), "mean": round(float(a.mean()), 1),
        "p50": int(np.percentile(a, 50)), "p90": int(np.percentile(a, 90)), "p99": int(np.percentile(a, 99)),
        "histogram": {"edges": edges.tolist(), "counts": hist.tolist()},
    }
