"""The confusion matrix as a small PNG (bare matplotlib `Figure`, never pyplot)."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from fedssl.io import atomic_write


def plot_confusion_matrix(confusion: Sequence[Sequence[int]], class_names: Sequence[str], path: str | os.PathLike,
                          title: str = "") -> None:
    """A PNG at `path`: true class (rows) against predicted class (columns). Each cell
    shows its count; its colour is the share of the true class's test images, so the
    diagonal reads as per-class recall whatever the class sizes. Written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = np.asarray(confusion, dtype=np.int64)
    support = counts.sum(axis=1, keepdims=True)
    shares = counts / np.maximum(support, 1)
    size = 1.6 + 0.55 * len(class_names)
    figure = Figure(figsize=(size + 1.0, size))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=axes, label="share of the true class", fraction=0.046, pad=0.04)
    ticks = range(len(class_names))
    axes.set_xticks(ticks, labels=list(class_names), rotation=45, ha="right", fontsize=8)
    axes.set_yticks(ticks, labels=[f"{name} ({n})" for name, n in zip(class_names, support[:, 0])], fontsize=8)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true (test images)")
    for i in ticks:
        for j in ticks:
            axes.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7,
                      color="white" if shares[i, j] > 0.5 else "black")
    if title:
        axes.set_title(title, fontsize=9)
    figure.tight_layout()
    atomic_write(path, lambda file: figure.savefig(file, format="png", dpi=80))
