"""Cross-device populations: round time and peak memory at 1,000, 10,000 and 100,000 clients.

The workload (issue 20, item 3): Fashion-MNIST's 60,000 training images, the
cross-device `draw` partition (each client draws `--samples` images from the pool
by its own seeded generator; 20 by default, a fifth of them its local test split),
`--per-round` clients sampled each round (100), batch 10, one local epoch, the
FedAvg CNN, evaluated on the server test set and on `--per-round` sampled clients
(`federation.evaluation.eval_clients`) after the last round. Each population runs the run loop
(a round: sampling, training, checks, aggregation; then the checkpoint, clients'
states included) in a fresh process, so its peak resident memory is its own.
FedPer runs too: its clients keep a personal head (client state), of which only
`federation.execution.states_in_memory` (100) stay in memory and the rest are spilled.

Printed per (algorithm, population): the median wall and CPU time of rounds 2..k
(round and checkpoint), the evaluation's wall and CPU time, the setup time (data, the
partition drawn and saved, the build) and the process's peak resident memory.
The targets: round times within 1.5x of each other across populations, and peak
memory under 2 GB.

    OMP_NUM_THREADS=1 python tools/bench_population.py                       # 1k, 10k, 100k; fedavg and fedper; 4 rounds
    python tools/bench_population.py --populations 1000 100000 --algorithms fedavg --rounds 3
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
from fedssl.engine.checkpoint import save_checkpoint
from fedssl.engine.federation import Federation
from fedssl.run_dir import CHECKPOINT, CLIENT_STATES, PARTITION

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
        "federation": {"clients": clients, "clients_per_round": per_round, "rounds": rounds,
                       "evaluation": {"eval_clients": per_round},
                       "execution": {"device": "cpu", "concurrency": "sequential"}},
        "logging": {"wandb": {"mode": "disabled"}, "progress": False},
    }


def peak_host_mb() -> float:
    """This process's peak resident memory (Linux reports KiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def measure(clients: int, algorithm: str, per_round: int, samples: int, rounds: int, path: str) -> dict:
    """One population's run, in this (fresh) process: the run loop of `run_federation`
    (a round, then its checkpoint with the clients' states), each phase timed in wall
    and CPU seconds (CPU time is what contention on a shared machine disturbs least)."""
    torch.set_num_threads(1)
    cfg = merge_config([recipe(clients, algorithm, per_round, samples, rounds, path)])
    clock = lambda: (time.perf_counter(), time.process_time())
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        began = clock()
        federation = Federation.build(cfg)
        federation.data.save(run_dir / PARTITION)
        setup = [b - a for a, b in zip(began, clock())]
        state, wall, cpu = federation.initial_state(), [], []
        for round_index in range(1, rounds + 1):
            began = clock()
            state, _ = federation.fit_round(round_index, state)
            save_checkpoint(run_dir / CHECKPOINT, {
                "round": round_index, "server_state": {"params": state.params, "momentum": state.momentum,
                                                       "extras": state.extras},
                "client_states": federation.clients.state_dict(run_dir / CLIENT_STATES, round_index)})
            wall.append(time.perf_counter() - began[0])
            cpu.append(time.process_time() - began[1])
        checkpoint_mb = (run_dir / CHECKPOINT).stat().st_size / 2**20
        began = clock()
        metrics, _ = federation.evaluate(state, rounds)
        evaluation = [b - a for a, b in zip(began, clock())]
    return {"clients": clients, "algorithm": algorithm, "round_s": statistics.median(wall[1:]),
            "round_cpu_s": statistics.median(cpu[1:]), "rounds_s": wall, "eval_s": evaluation[0], "eval_cpu_s": evaluation[1],
            "setup_s": setup[0], "peak_mb": peak_host_mb(), "checkpoint_mb": checkpoint_mb,
            "states": len(federation.clients.store), "states_in_memory": federation.clients.store.in_memory,
            "client_acc_mean": metrics["client_acc_mean"], "global_acc": metrics["global_acc"]}


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
    parser.add_argument("--rounds", type=int, default=4, help="rounds 2..rounds are timed; at least 2")
    parser.add_argument("--path", default=FASHION_MNIST, help="the Fashion-MNIST IDX folder")
    args = parser.parse_args()

    print(f"machine: {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
          f"load average at start {os.getloadavg()[0]:.2f}")
    print(f"{args.per_round} clients a round of {args.samples} samples each, {args.rounds} rounds; round: median of "
          f"rounds 2..{args.rounds} (round + checkpoint); eval: the server test set and {args.per_round} clients")
    print(f"{'algorithm':>9} {'clients':>8} {'round s':>8} {'cpu s':>6} {'eval s':>7} {'cpu s':>6} {'setup s':>8} "
          f"{'peak MB':>8} {'ckpt MB':>8} {'states':>7}  rounds s")
    ok = True
    for algorithm in args.algorithms:
        rows = []
        for clients in args.populations:
            row = in_child(measure, clients, algorithm, args.per_round, args.samples, args.rounds, args.path)
            rows.append(row)
            print(f"{algorithm:>9} {clients:>8} {row['round_s']:>8.2f} {row['round_cpu_s']:>6.2f} {row['eval_s']:>7.2f} {row['eval_cpu_s']:>6.2f} "
                  f"{row['setup_s']:>8.2f} {row['peak_mb']:>8.0f} {row['checkpoint_mb']:>8.2f} {row['states']:>7}  "
                  + " ".join(f"{s:.2f}" for s in row["rounds_s"]), flush=True)
        times = [row["round_cpu_s"] for row in rows]
        ratio = max(times) / min(times)
        memory_ok = all(row["peak_mb"] < MEMORY_LIMIT_MB for row in rows)
        ok &= ratio <= RATIO_LIMIT and memory_ok
        print(f"{algorithm}: slowest / fastest round (CPU time) {ratio:.2f}x (target <= {RATIO_LIMIT}), "
              f"peak memory {'under' if memory_ok else 'OVER'} {MEMORY_LIMIT_MB} MB")
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
