"""PNG plots (matplotlib, Agg backend, written atomically)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from mixprec.io_utils import atomic_path


def accuracy_vs_bytes(path: str | os.PathLike[str], labels: Sequence[str], accuracy: Sequence[float],
                      total_bytes: Sequence[int], title: str) -> None:
    """Scatter of accuracy (%) against total model bytes (log scale), one labeled point each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    ax.scatter(total_bytes, accuracy, color="tab:blue", zorder=3)
    for label, x, y in zip(labels, total_bytes, accuracy):
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("model bytes (weights, biases, scales, zero points)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
