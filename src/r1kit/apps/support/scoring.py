"""Classification scores for ``r1kit apps intent eval``: accuracy, macro-F1, per-intent recall and the
confusion matrix, from gold and predicted labels."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def confusion(gold: Sequence[str], predicted: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    """[gold, predicted] counts over ``labels`` (a prediction outside ``labels`` counts in no column)."""
    index = {label: i for i, label in enumerate(labels)}
    matrix = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for g, p in zip(gold, predicted, strict=True):
        if p in index:
            matrix[index[g], index[p]] += 1
    return matrix


def scores(gold: Sequence[str], predicted: Sequence[str], labels: Sequence[str]) -> dict:
    """``accuracy``, ``macro_f1`` (the mean over ``labels`` of F1, 0 where undefined) and ``recall`` per label."""
    matrix = confusion(gold, predicted, labels)
    true_positive = np.diag(matrix).astype(float)
    support, claimed = matrix.sum(1), matrix.sum(0)
    recall = np.divide(true_positive, support, out=np.zeros_like(true_positive), where=support > 0)
    precision = np.divide(true_positive, claimed, out=np.zeros_like(true_positive), where=claimed > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(true_positive), where=precision + recall > 0)
    accuracy = sum(g == p for g, p in zip(gold, predicted)) / max(len(gold), 1)
    return {"accuracy": accuracy, "macro_f1": float(f1.mean()), "recall": dict(zip(labels, recall.tolist())), "confusion": matrix.tolist()}
