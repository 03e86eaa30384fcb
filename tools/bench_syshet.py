"""Time-to-accuracy under system heterogeneity: FedAvg waiting for all, a deadline
that drops late clients, partial work, FedNova with partial work, and FedBuff, on
one partition, one device profile set and one budget of client work.

    OMP_NUM_THREADS=1 python tools/bench_syshet.py [--out runs/bench-syshet] [--seeds 1]

Every variant trains on Fashion-MNIST (Debian's IDX files), 20 clients Dir(0.5), the
FedAvg CNN, 10 local SGD steps of 32 images per client round, under the `mobile`
device profiles (median 30 samples/s, 1 MB/s up, 4 MB/s down). The synchronous
variants run ROUNDS rounds of 10 clients; FedBuff (buffer 5, 10 clients in flight)
runs 2 x ROUNDS flushes, the same number of client trainings. Simulated time is
what is compared (never this machine's seconds). Finished runs are kept, so a
killed benchmark continues where it stopped. Writes OUT/table.md and
OUT/time_to_accuracy.png (global accuracy against simulated seconds).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedssl.io import atomic_write_text
from fedssl.launch import complete
from fedssl.tracking.compare import comparison_table, plot_curves
from fedssl.tracking.runs import RunRecord, read_run_dir

RECIPE = "recipes/fedavg_fashion_mnist.yaml"
ROUNDS = 12
DEADLINE = 20.0  # simulated seconds: about the median client's full round under these profiles
COMMON = [
    "data.partition.alpha=0.5", "train.local_steps=10", "train.batch_size=32", "train.lr=0.05",
    "federation.clients_per_round=10", "federation.system.profile=mobile", "federation.system.speed=30",
    "logging.progress=false", "logging.wandb.mode=disabled",
]
SYNC = [f"federation.rounds={ROUNDS}", "federation.evaluation.eval_every=3"]
VARIANTS = {
    "fedavg_wait_all": SYNC,
    "fedavg_deadline": SYNC + ["federation.system.policy=deadline", f"federation.system.deadline={DEADLINE}"],
    "fedavg_partial": SYNC + ["federation.system.policy=partial", f"federation.system.deadline={DEADLINE}"],
    "fednova_partial": SYNC + ["algorithm.name=fednova", "federation.system.policy=partial",
                               f"federation.system.deadline={DEADLINE}"],
    "fedbuff": [f"federation.rounds={2 * ROUNDS}", "federation.evaluation.eval_every=6", "algorithm.name=fedbuff",
                "algorithm.fedbuff.buffer_size=5", "algorithm.fedbuff.concurrency=10"],
}


def time_to(record: RunRecord, target: float) -> float | None:
    """Simulated seconds until global accuracy first reached `target` (None: never)."""
    for row in record.history:
        if row.get("global_acc") is not None and row["global_acc"] >= target:
            return row["sim_time"]
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench-syshet")
    parser.add_argument("--seeds", type=int, default=1)
    args = parser.parse_args()
    out = Path(args.out)
    records: dict[str, list[RunRecord]] = {}
    for label, overrides in VARIANTS.items():
        for seed in range(args.seeds):
            run_dir, _ = complete(RECIPE, COMMON + overrides + [f"seed={seed}", f"name={label}_s{seed}",
                                                                f"output_dir={out}"])
            records.setdefault(label, []).append(read_run_dir(run_dir))
    reference = records["fedavg_wait_all"]
    target = min(r.summary["global_acc"] for r in reference)
    base_reached = max(time_to(r, target) for r in reference)
    base_total = max(r.summary["sim_time"] for r in reference)
    lines = [f"Target: FedAvg wait-for-all's final global accuracy, {target:.4f}; FedAvg first reached it at "
             f"{base_reached:.0f} and ran {base_total:.0f} simulated seconds.", "",
             "| variant | final global acc | simulated time (s) | time to target (s) | / FedAvg's time to target "
             "| / FedAvg's total time | late clients | partial clients |",
             "|---|---|---|---|---|---|---|---|"]
    for label, runs in records.items():
        for record in runs:
            reached = time_to(record, target)
            late = sum(row.get("late_clients", 0) for row in record.history)
            partial = sum(row.get("partial_clients", 0) for row in record.history)
            ratios = (f"{reached / base_reached:.2f} | {reached / base_total:.2f}" if reached is not None
                      else "not reached | not reached")
            lines.append(f"| {label} | {record.summary['global_acc']:.4f} | {record.summary['sim_time']:.0f} | "
                         f"{'-' if reached is None else round(reached)} | {ratios} | {late} | {partial} |")
    table = "\n".join(lines) + "\n\n" + comparison_table(records) + "\n"
    atomic_write_text(out / "table.md", table)
    plot_curves(records, out / "time_to_accuracy.png", metric="global_acc", x="sim_time")
    print(table)


if __name__ == "__main__":
    main()
