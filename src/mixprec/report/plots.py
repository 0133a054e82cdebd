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


def score_vs_cost(path: str | os.PathLike[str], searched: Sequence[tuple[int, float | None, float]],
                  marked: Sequence[tuple[str, int, float | None, float]], title: str, ylabel: str) -> None:
    """Pareto plot: a score against model bytes (left) and predicted latency in ms (right,
    when known). ``searched`` are ``(bytes, latency_ms, score)`` points joined by a line;
    ``marked`` are labelled points ``(label, bytes, latency_ms, score)``, e.g. uniform precisions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_latency = all(p[1] is not None for p in searched) and bool(searched)
    fig, axes = plt.subplots(1, 2 if with_latency else 1, figsize=(13 if with_latency else 8, 5), dpi=120,
                             squeeze=False)
    panels = [(axes[0][0], 0, "model MB (weights, biases, scales, zero points; 1 MB = 10^6 B)")]
    if with_latency:
        panels.append((axes[0][1], 1, "predicted latency (ms)"))
    colors = plt.get_cmap("tab10").colors
    for ax, key, xlabel in panels:
        unit = 1e-6 if key == 0 else 1.0
        points = sorted((p[key] * unit, p[2]) for p in searched)  # type: ignore[operator]
        # Bytes are the budget axis, so the searched points form a curve; latency is only predicted for them.
        ax.plot([x for x, _ in points], [y for _, y in points], "o-" if key == 0 else "o", color="black",
                label="searched (ILP)", zorder=2)
        for index, (label, size, ms, score) in enumerate(marked):
            x = size * 1e-6 if key == 0 else ms
            if x is not None:
                ax.scatter(x, score, marker="s", s=60, color=colors[index % len(colors)], label=label, zorder=3)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
