"""Cross-device populations: round time and peak memory at 1,000, 10,000 and 100,000 clients.

The workload (issue 20, item 3): Fashion-MNIST's 60,000 training images, the
cross-device `draw` partition (each client draws `--samples` images from the pool
by its own seeded generator; 20 by default, a fifth of them its local test split),
`--per-round` clients sampled each round (100), batch 10, one local epoch, the
FedAvg CNN, evaluated on the server test set and on `--per-round` sampled clients
(`federation.eval_clients`) after the last round. Each population runs the whole run loop
(`run_federation`: sampling, training, evaluation, metrics.jsonl and a checkpoint
every round) in a fresh process, so its peak resident memory is its own.
FedPer runs too: its clients keep a personal head (client state), of which only
`federation.states_in_memory` (100) stay in memory and the rest are spilled.

Printed per (algorithm, population): the median time of the training rounds 2..k-1
(sampling, training, aggregation, metrics and checkpoint), what the last round's
evaluation added, the setup time (data, partition, build) and the process's peak
resident memory.
The targets: round times within 1.5x of each other across populations, and peak
memory under 2 GB.

    OMP_NUM_THREADS=1 python tools/bench_population.py                       # 1k, 10k, 100k; fedavg and fedper; 5 rounds
    python tools/bench_population.py --populations 1000 100000 --algorithms fedavg --rounds 4
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from fedssl.config.load import merge_config
from fedssl.federation.run import run_federation
from fedssl.tracking.run_logger import read_metrics

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
MEMORY_LIMIT_MB = 2048
RATIO_LIMIT = 1.5


def recipe(clients: int, algorithm: str, per_round: int, samples: int, rounds: int, path: str) -> dict:
    return {
        "name": f"population-{algorithm}-{clients}",
        "data": {"source": "idx", "path": path, "image_size": 28, "channels": 1,
                 "partition": {"scheme": "draw", "samples_per_client": samples, "local_test_fraction": 0.2}},
        "model": {"name": "fedavg_cnn"},
        "train": {"lr": 0.01, "batch_size": 10, "local_epochs": 1},
        "algorithm": {"name": algorithm},
        "federation": {"clients": clients, "clients_per_round": per_round, "eval_clients": per_round,
                       "rounds": rounds, "eval_every": rounds, "device": "cpu", "concurrency": "sequential"},
        "logging": {"wandb": {"mode": "disabled"}, "progress": False},
    }


def peak_host_mb() -> float:
    """This process's peak resident memory (Linux reports KiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def measure(clients: int, algorithm: str, per_round: int, samples: int, rounds: int, path: str) -> dict:
    """One population's run, in this (fresh) process."""
    torch.set_num_threads(1)
    cfg = merge_config([recipe(clients, algorithm, per_round, samples, rounds, path)])
    with tempfile.TemporaryDirectory() as tmp:
        began = time.perf_counter()
        run_federation(cfg, Path(tmp) / "run")
        total = time.perf_counter() - began
        history = read_metrics(Path(tmp) / "run" / "metrics.jsonl")
        checkpoint_mb = (Path(tmp) / "run" / "checkpoint.pt").stat().st_size / 2**20
    elapsed = [0.0] + [m["seconds"] for m in history]
    per_round_s = [after - before for before, after in zip(elapsed[:-1], elapsed[1:])]
    round_s = statistics.median(per_round_s[1:-1])
    return {"clients": clients, "algorithm": algorithm, "round_s": round_s, "eval_s": per_round_s[-1] - round_s,
            "rounds_s": per_round_s, "setup_s": total - elapsed[-1], "peak_mb": peak_host_mb(),
            "checkpoint_mb": checkpoint_mb, "client_acc_mean": history[-1]["client_acc_mean"],
            "global_acc": history[-1]["global_acc"]}


def in_child(function, *args):
    """Run `function(*args)` in a fresh process (its peak memory is then its own)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--populations", type=int, nargs="+", default=[1000, 10_000, 100_000])
    parser.add_argument("--algorithms", nargs="+", default=["fedavg", "fedper"])
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--samples", type=int, default=20, help="samples each client draws (data.partition.samples_per_client)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds 2..rounds-1 are timed; at least 3")
    parser.add_argument("--path", default=FASHION_MNIST, help="the Fashion-MNIST IDX folder")
    args = parser.parse_args()

    print(f"machine: {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
          f"load average at start {os.getloadavg()[0]:.2f}")
    print(f"{args.per_round} clients a round of {args.samples} samples each, {args.rounds} rounds; round s: median of "
          f"rounds 2..{args.rounds - 1}; eval s: what evaluating the server test set and {args.per_round} clients "
          f"added to round {args.rounds}")
    print(f"{'algorithm':>9} {'clients':>8} {'round s':>8} {'eval s':>8} {'setup s':>8} {'peak MB':>8} {'ckpt MB':>8} "
          f"{'client acc':>10}  rounds s")
    ok = True
    for algorithm in args.algorithms:
        rows = []
        for clients in args.populations:
            row = in_child(measure, clients, algorithm, args.per_round, args.samples, args.rounds, args.path)
            rows.append(row)
            print(f"{algorithm:>9} {clients:>8} {row['round_s']:>8.2f} {row['eval_s']:>8.2f} {row['setup_s']:>8.2f} {row['peak_mb']:>8.0f} "
                  f"{row['checkpoint_mb']:>8.1f} {row['client_acc_mean']:>10.3f}  "
                  + " ".join(f"{s:.2f}" for s in row["rounds_s"]), flush=True)
        times = [row["round_s"] for row in rows]
        ratio = max(times) / min(times)
        memory_ok = all(row["peak_mb"] < MEMORY_LIMIT_MB for row in rows)
        ok &= ratio <= RATIO_LIMIT and memory_ok
        print(f"{algorithm}: slowest / fastest round {ratio:.2f}x (target <= {RATIO_LIMIT}), "
              f"peak memory {'under' if memory_ok else 'OVER'} {MEMORY_LIMIT_MB} MB")
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
