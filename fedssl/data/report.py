"""What `fedssl data RECIPE` shows: a per-client table and two pictures.

The pictures are drawn on a bare matplotlib `Figure` (Agg canvas), never through
pyplot, so importing this module changes no global backend state.
"""

from __future__ import annotations

import os

import numpy as np

from fedssl.data.dataset import ImageDataset
from fedssl.data.federated import FederatedData
from fedssl.extras import require
from fedssl.io import atomic_write

SHORT_NAME = 6


def _short_names(names: tuple[str, ...], width: int = SHORT_NAME) -> list[str]:
    """Class names cut to `width` characters, made unique by a numeric suffix."""
    out: list[str] = []
    for i, name in enumerate(names):
        short = str(name)[:width] or str(i)
        k = 1
        while short in out:
            suffix = str(k)
            short = str(name)[: max(1, width - len(suffix))] + suffix
            k += 1
        out.append(short)
    return out


def client_table(fed: FederatedData) -> str:
    """A plain-text table: one row per client (samples = labeled + unlabeled + test),
    a server row (its labeled set and the server test set) and a total row. The class
    columns count training samples (labeled + unlabeled) per class; the server row
    counts its labeled samples."""
    classes = _short_names(fed.class_names)
    header = ["client", "samples", "labeled", "unlabeled", "test", *classes]
    rows: list[list[str]] = []
    hist = fed.client_class_counts()
    for client, counts in zip(fed.clients, hist):
        rows.append([
            str(client.client_id), str(client.num_samples), str(len(client.labeled)),
            str(len(client.unlabeled)), str(len(client.test)), *map(str, counts),
        ])
    server_counts = fed.class_counts(fed.server_labeled)
    server = [len(fed.server_labeled) + len(fed.test), len(fed.server_labeled), 0, len(fed.test)]
    rows.append(["server", *map(str, server), *map(str, server_counts)])
    totals = [
        sum(c.num_samples for c in fed.clients) + server[0],
        sum(len(c.labeled) for c in fed.clients) + server[1],
        sum(len(c.unlabeled) for c in fed.clients),
        sum(len(c.test) for c in fed.clients) + server[3],
    ]
    rows.append(["total", *map(str, totals), *map(str, hist.sum(axis=0) + server_counts)])

    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        numbers = [c.rjust(w) for c, w in zip(cells[1:5], widths[1:5])]
        per_class = [c.rjust(w) for c, w in zip(cells[5:], widths[5:])]
        return "  ".join([first, *numbers]) + "  | " + "  ".join(per_class)

    rule = "-" * len(line(header))
    body = [line(r) for r in rows[:-2]]
    return "\n".join([
        line(header), rule, *body, rule, line(rows[-2]), line(rows[-1]),
        f"class columns: training samples (labeled + unlabeled) per class; test: local test splits "
        f"(server row: the server test set of {len(fed.test)})",
    ])


def _save_atomic(fig, path: str | os.PathLike, dpi: int) -> None:
    atomic_write(path, lambda file: fig.savefig(file, format="png", dpi=dpi, bbox_inches="tight"))


def _figure(width: float, height: float):
    require("matplotlib", "plots")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def plot_partition_heatmap(fed: FederatedData, path: str | os.PathLike) -> None:
    """A PNG heatmap at `path`: clients (rows) x classes (columns), each cell the
    client's training samples (labeled + unlabeled) of that class. Written atomically."""
    counts = fed.client_class_counts()
    n_clients, n_classes = counts.shape
    width = min(4.0 + 0.7 * n_classes, 20.0)
    height = min(2.0 + 0.3 * max(n_clients, 1), 24.0)
    fig = _figure(width, height)
    ax = fig.add_subplot(1, 1, 1)
    shown = counts if n_clients else np.zeros((1, n_classes), dtype=np.int64)
    image = ax.imshow(shown, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="training samples")
    ax.set_xticks(range(n_classes), labels=list(fed.class_names), rotation=45, ha="right")
    step = max(1, int(np.ceil(n_clients / 40)))
    ticks = list(range(0, n_clients, step))
    ax.set_yticks(ticks, labels=[str(fed.clients[i].client_id) for i in ticks])
    ax.set_xlabel("class")
    ax.set_ylabel("client")
    labeled = sum(len(c.labeled) for c in fed.clients)
    total = int(counts.sum())
    ax.set_title(f"Training samples per client and class\n{n_clients} clients, {total} training samples, {labeled} labeled")
    if 0 < n_clients <= 30 and n_classes <= 15:
        threshold = shown.max() / 2 if shown.max() > 0 else 1
        for i in range(n_clients):
            for j in range(n_classes):
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7,
                        color="black" if counts[i, j] > threshold else "white")
    _save_atomic(fig, path, dpi=100)


def plot_class_samples(dataset: ImageDataset, path: str | os.PathLike, per_class: int = 8, seed: int = 0) -> None:
    """A PNG grid at `path`: one row per class (its name on the left), `per_class`
    randomly chosen images of it (fewer when the class has fewer). Grayscale and RGB
    images both work. Written atomically."""
    rng = np.random.default_rng(seed)
    n_classes = dataset.num_classes
    per_class = max(1, int(per_class))
    cell = 1.1
    fig = _figure(1.6 + cell * per_class, 0.3 + cell * max(n_classes, 1))
    axes = fig.subplots(max(n_classes, 1), per_class, squeeze=False)
    for row in range(n_classes):
        members = np.flatnonzero(dataset.labels == row)
        chosen = np.sort(rng.choice(members, size=min(per_class, len(members)), replace=False))
        for col in range(per_class):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if col < len(chosen):
                image = dataset.images[chosen[col]]
                if image.shape[-1] == 1:
                    ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
                else:
                    ax.imshow(image, interpolation="nearest")
            elif col == 0:
                ax.text(0.5, 0.5, "no samples", ha="center", va="center", fontsize=8, transform=ax.transAxes)
        axes[row, 0].set_ylabel(dataset.class_names[row], rotation=0, ha="right", va="center", fontsize=10)
    fig.suptitle(f"{per_class} random samples per class", fontsize=11)
    _save_atomic(fig, path, dpi=100)
