"""The evaluation's picture: the confusion matrix as a PNG (matplotlib, Agg), row-normalised so each
row reads as where that intent's messages went."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from r1kit.data.records import AtomicWriter


def plot_confusion(matrix: Sequence[Sequence[int]], labels: Sequence[str], file: str | Path, title: str) -> Path:
    counts = np.asarray(matrix, dtype=float)
    shares = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    size = max(6.0, 0.42 * len(labels))
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    for i, j in zip(*np.nonzero(counts)):
        ax.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=6, color="white" if shares[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true intent")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.04, label="share of the true intent's messages")
    fig.tight_layout()
    file = Path(file)
    with AtomicWriter(file, "wb") as out:
        fig.savefig(out.file, format="png", dpi=110)
    plt.close(fig)
    return file
