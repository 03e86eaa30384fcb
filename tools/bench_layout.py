"""Cost of one SGD step in each weight layout (`train.memory_format`), on one CPU thread.

The FedAvg CNN (and its BatchNorm variant, FedMatch's labels-at-server model) trains
on batches of 10 (the standard workload, PFLlib), 64 (the semi-supervised recipes'
labeled batch) and 448 (their unlabeled batch: 64 x mu = 7), contiguous against
channels-last, the two alternated so that both see the same machine. One thread,
as a worker process (`federation.execution.workers`) trains. Prints a markdown table of the
median milliseconds per step over `--repeats` rounds of about 6,000 images each.

    OMP_NUM_THREADS=1 python tools/bench_layout.py [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from fedssl.models.cnn import FedAvgCNN

LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def step_ms(model: torch.nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
            batches: list[torch.Tensor]) -> float:
    began = time.perf_counter()
    for index in batches:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images[index]), labels[index]).backward()
        optimizer.step()
    return (time.perf_counter() - began) / len(batches) * 1e3


def measure(batch: int, batch_norm: bool, repeats: int) -> dict[str, float]:
    """Median ms per step of each layout, the same batches for both."""
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.rand(3000, 1, 28, 28, generator=generator), torch.randint(0, 10, (3000,), generator=generator)
    batches = [torch.randint(0, 3000, (batch,), generator=generator) for _ in range(max(10, 6000 // batch))]
    runs = {}
    for name, layout in LAYOUTS.items():
        model = FedAvgCNN(batch_norm=batch_norm).to(memory_format=layout)
        runs[name] = (model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
        step_ms(*runs[name], images, labels, batches[:5])  # warm-up: oneDNN builds its kernels once
    times = {name: [] for name in LAYOUTS}
    for _ in range(repeats):
        for name, (model, optimizer) in runs.items():
            times[name].append(step_ms(model, optimizer, images, labels, batches))
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a worker process trains on one)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.machine()}, {args.threads} torch thread(s), torch {torch.__version__}; "
          f"median of {args.repeats}, ms per SGD step (forward, backward, momentum SGD)")
    print("| model | batch | contiguous | channels_last | speedup |")
    print("| --- | --- | --- | --- | --- |")
    for batch_norm in (False, True):
        for batch in (10, 64, 448):
            row = measure(batch, batch_norm, args.repeats)
            print(f"| {'fedavg_cnn_bn' if batch_norm else 'fedavg_cnn'} | {batch} | {row['contiguous']:.2f} | "
                  f"{row['channels_last']:.2f} | **{row['contiguous'] / row['channels_last']:.2f}x** |", flush=True)


if __name__ == "__main__":
    main()
