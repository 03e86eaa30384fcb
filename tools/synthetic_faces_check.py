"""Calibrate the synthetic faces: how hard is the task for a small CNN?

Generates the default dataset (20,000 images of 100 people), holds out 20% as a
test set, and trains the FedAvg CNN (McMahan et al., 2017) centrally twice: on all
training labels, and on only `--per-class` labels per class. The generator is
tuned so that the first lands well above chance and clearly below 100%, and the
second clearly lower. Also writes a grid of samples (one row per class).

    python tools/synthetic_faces_check.py [--epochs 3] [--lr 0.02] [--grid /tmp/synthetic_faces_grid.png]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

from fedssl.data.sources.synthetic_faces import DATASET_SEED, generate_synthetic_faces


class FedAvgCNN(nn.Module):
    """Two 5x5 conv layers (32, 64 channels) with 2x2 max pooling, FC 512, linear output."""

    def __init__(self, channels: int, size: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * (size // 4) ** 2, 512), nn.ReLU(), nn.Linear(512, num_classes)
        )

    def forward(self, x):
        return self.head(self.features(x))


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) to float (N, C, H, W), roughly zero-mean unit-scale."""
    return (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.25


def train(x, y, steps: int, lr: float, batch: int, seed: int, num_classes: int) -> nn.Module:
    """SGD with momentum 0.9 for a fixed number of steps over reshuffled epochs."""
    torch.manual_seed(seed)
    model = FedAvgCNN(x.shape[1], x.shape[2], num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    done = 0
    while done < steps:
        order = torch.randperm(len(y), generator=gen)
        for lo in range(0, len(y), batch):
            idx = order[lo : lo + batch]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
            if done >= steps:
                break
    return model


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    model.eval()
    return torch.cat([model(x[lo : lo + 500]).argmax(1) for lo in range(0, len(x), 500)]).numpy()


def report(name: str, pred: np.ndarray, y: np.ndarray, class_names, seconds: float) -> None:
    """Overall and per-class accuracy, and each class's most frequent confusion."""
    k = len(class_names)
    confusion = np.zeros((k, k), dtype=int)
    np.add.at(confusion, (y, pred), 1)
    print(f"{name}: test accuracy {np.mean(pred == y):.3f}  ({seconds:.0f} s)")
    for c in range(k):
        row = confusion[c].copy()
        total, correct = row.sum(), row[c]
        row[c] = -1
        worst = int(row.argmax())
        print(f"  {class_names[c]:>9}: {correct / max(total, 1):.2f} of {total:4d}, "
              f"most confused with {class_names[worst]} ({row[worst] / max(total, 1):.2f})")


def save_grid(ds, path: str, per_row: int = 8) -> None:
    """One row per class, `per_row` samples each, upscaled 3x."""
    from PIL import Image

    rows = []
    for c in range(ds.num_classes):
        idx = np.flatnonzero(ds.labels == c)[:per_row]
        rows.append(np.concatenate([ds.images[i] for i in idx], axis=1))
    grid = np.concatenate(rows, axis=0)
    grid = grid[..., 0] if grid.shape[-1] == 1 else grid
    Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--identities", type=int, default=100)
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--few-steps", type=int, default=100, help="SGD steps for the few-labels run")
    parser.add_argument("--seed", type=int, default=DATASET_SEED)
    parser.add_argument("--grid", default="/tmp/synthetic_faces_grid.png")
    args = parser.parse_args()
    torch.set_num_threads(1)

    start = time.perf_counter()
    ds = generate_synthetic_faces(args.samples, args.identities, args.seed, args.size)
    print(f"generated {len(ds)} images of {args.identities} people at {args.size}x{args.size} "
          f"in {time.perf_counter() - start:.2f} s")
    print("class counts:", dict(zip(ds.class_names, np.bincount(ds.labels, minlength=ds.num_classes).tolist())))
    save_grid(ds, args.grid)
    print(f"sample grid: {args.grid}")

    rng = np.random.default_rng(0)
    order = rng.permutation(len(ds))
    n_test = len(ds) // 5
    test, pool = order[:n_test], order[n_test:]
    x, y = to_tensor(ds.images), torch.from_numpy(ds.labels)
    y_test = ds.labels[test]

    few = np.concatenate([pool[ds.labels[pool] == c][: args.per_class] for c in range(ds.num_classes)])
    start = time.perf_counter()
    model = train(x[few], y[few], args.few_steps, args.lr, min(args.batch, len(few)), 0, ds.num_classes)
    report(f"{args.per_class} labels per class ({len(few)} images, {args.few_steps} steps)",
           predict(model, x[test]), y_test, ds.class_names, time.perf_counter() - start)

    steps = int(args.epochs * np.ceil(len(pool) / args.batch))
    start = time.perf_counter()
    model = train(x[pool], y[pool], steps, args.lr, args.batch, 0, ds.num_classes)
    report(f"all labels ({len(pool)} images, {args.epochs:g} epochs, lr {args.lr}, batch {args.batch})",
           predict(model, x[test]), y_test, ds.class_names, time.perf_counter() - start)


if __name__ == "__main__":
    main()
