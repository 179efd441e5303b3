"""The grouped bar chart of test accuracies that the quality benchmarks write."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def accuracy_bars(path: Path, labels: Sequence[str], series: Mapping[str, Sequence[float]],
                  title: str, ylabel: str = "test accuracy", fontsize: int = 7) -> None:
    """One group of bars per label, one bar per series (same length as ``labels``)."""
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(8, len(labels) * 0.9), 4.5))
    for i, (name, values) in enumerate(series.items()):
        ax.bar([x + i * width for x in range(len(labels))], list(values), width, label=name)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(labels))], list(labels),
                  fontsize=fontsize)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=3)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
