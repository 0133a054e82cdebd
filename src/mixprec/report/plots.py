"""PNG plots (matplotlib, Agg backend, written atomically)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from mixprec.io_utils import atomic_path


def accuracy_vs_bytes(path: str | os.PathLike[str], labels: Sequence[str], accuracy: Sequence[float],
                      total_bytes: Sequence[int], title: str, ylabel: str = "test accuracy (%)") -> None:
    """Scatter of a score (accuracy in %, by default) against total model bytes (log
    scale); a legend names each point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5), dpi=120)
    markers = "osD^v<>pP*Xh"
    colors = plt.get_cmap("tab20").colors
    for index, (label, x, y) in enumerate(zip(labels, total_bytes, accuracy)):
        ax.scatter(x, y, marker=markers[index % len(markers)], color=colors[index % len(colors)], s=50,
                   label=f"{label} ({y:.2f}, {x:,} B)", zorder=3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    ax.set_xscale("log")
    ax.set_xlabel("model bytes (weights, biases, scales, zero points)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
