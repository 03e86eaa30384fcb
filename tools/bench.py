"""Time one FedAvg round of fedssl's in-process loop against an ideal plain loop.

The workload (DESIGN.md, issue 6): 20 clients x 3,000 random 28x28x1 images of 10
classes, 1 local epoch, batch 10, SGD, the FedAvg CNN. The ideal reference trains
one model on data already on the device with a plain PyTorch loop doing the same
number of SGD steps. Run:

    python tools/bench_round.py [--clients 20] [--samples 3000] [--repeats 2]
"""

from __future__ import annotations

import argparse
import platform
import time
from itertools import islice

import numpy as np
import torch
import torch.nn.functional as F

from fedssl.config.load import merge_config
from fedssl.data.dataset import ImageDataset, SourceData
from fedssl.data.federated import build_federated_data
from fedssl.federation.loop import Federation
from fedssl.federation.client import round_steps
from fedssl.federation.tensors import TensorPool, cycle_batches
from fedssl.models.factory import build_model


def random_source(num_samples: int, seed: int = 0) -> SourceData:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(num_samples, 28, 28, 1), dtype=np.uint8)
    labels = rng.integers(0, 10, size=num_samples).astype(np.int64)
    names = tuple(str(i) for i in range(10))
    test = ImageDataset(images[:100], labels[:100], names)
    return SourceData(train=ImageDataset(images, labels, names), test=test)


def ideal_loop(cfg, pool: TensorPool, steps_per_client: list[np.ndarray]) -> float:
    """One model, data on the device, plain SGD over the same batches."""
    model = build_model(cfg.model, 10, 1, 28).to(pool.images.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.train.lr)
    began = time.perf_counter()
    for batches in steps_per_client:
        for indices in batches:
            index = torch.from_numpy(indices).to(pool.images.device)
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(pool.images[index]), pool.labels[index]).backward()
            optimizer.step()
    if pool.images.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--samples", type=int, default=3000, help="samples per client")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    cfg = merge_config([{
        "data": {"image_size": 28, "partition": {"scheme": "iid", "local_test_fraction": 0.0}},
        "train": {"lr": 0.01, "batch_size": 10, "local_epochs": 1},
        "federation": {"clients": args.clients, "clients_per_round": args.clients, "device": args.device},
        "logging": {"wandb": {"mode": "disabled"}, "progress": False},
    }])
    data = build_federated_data(random_source(args.clients * args.samples), cfg.data, args.clients, cfg.seed)
    federation = Federation.build(cfg, data)
    batches = [
        list(islice(cycle_batches(c.labeled, 10, np.random.default_rng(c.client_id)), round_steps(len(c.labeled), 0, cfg.train, 0)))
        for c in data.clients
    ]
    steps = sum(len(b) for b in batches)

    fl_times, ideal_times = [], []
    state = federation.initial_state()
    for repeat in range(args.repeats):
        began = time.perf_counter()
        state, _ = federation.fit_round(repeat + 1, state)
        if federation.pool.images.is_cuda:
            torch.cuda.synchronize()
        fl_times.append(time.perf_counter() - began)
        ideal_times.append(ideal_loop(cfg, federation.pool, batches))
    fl, ideal = min(fl_times), min(ideal_times)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, device {args.device}")
    print(f"workload: {args.clients} clients x {args.samples} samples, batch 10, 1 epoch: {steps} SGD steps per round")
    print(f"fedssl round: {fl:.2f} s ({steps * 10 / fl:,.0f} images/s)")
    print(f"ideal loop:   {ideal:.2f} s ({steps * 10 / ideal:,.0f} images/s)")
    print(f"ratio fedssl/ideal: {fl / ideal:.3f}")


if __name__ == "__main__":
    main()
