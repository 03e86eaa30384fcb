"""FedMA against FedAvg and FedProx at equal communication, then a markdown table.

    python tools/bench_fedma.py fashion_mnist [--budget cpu|full] [--seeds 1] [--only fedma fedavg ...] [--out DIR]

Every algorithm runs the FedMA recipe of the dataset (same partition, clients,
model, optimizer and local work) with only `algorithm.name` changed, for the same
number of rounds; all clients take part every round. The table gives the global
model's test accuracy after round R, its best over the run, the bytes sent both
ways (training and evaluation traffic as every run counts it) and each one's
accuracy after its last round within the lightest run's total bytes (equal bytes:
FedMA's matched layers grow, so a round of it may weigh more). `--budget full` runs the recipe as written; `cpu` caps each
client's round at a fixed number of steps and the run at fewer rounds, to fit a
2-core CPU. Finished runs are kept, so a killed benchmark continues where it
stopped. Writes OUT/table.md; BENCHMARKS.md records it with the command.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedssl.io import atomic_write_text
from fedssl.launch import complete
from fedssl.tracking.compare import mean_std
from fedssl.tracking.runs import RunRecord, read_run_dir

ENTRIES = [  # (key for --only, label, overrides)
    ("fedma", "FedMA", ["algorithm.name=fedma"]),
    ("fedavg", "FedAvg", ["algorithm.name=fedavg"]),
    ("fedprox", "FedProx (mu 0.01)", ["algorithm.name=fedprox", "algorithm.proximal_mu=0.01"]),
]
# 20 local steps of 32 images per client and round (about a tenth of a local epoch on
# Fashion-MNIST's 10 Dir(0.5) clients), 10 rounds: FedMA's 4 layer-wise rounds
# (conv1, conv2, fc1 matched, then the classifier) and 6 FedAvg rounds on the matched
# model; 5% of each client's samples as its local test split (the table reads the
# server's test set), so that scoring does not outweigh training.
CPU_BUDGET = ["train.local_steps=20", "train.batch_size=32", "federation.rounds=10",
              "data.partition.local_test_fraction=0.05"]
# The faces are drawn at 28x28 instead of 48x48 on the CPU budget: the same network
# size as on Fashion-MNIST (fc1 reads 1,024 inputs instead of 5,184).
CPU_DATASET = {"faces": ["data.image_size=28"], "fashion_mnist": []}


def curve(run: RunRecord) -> list[tuple[int, float, int]]:
    """(round, global_acc, cumulative bytes up + down) of every evaluated round."""
    points, total = [], 0
    for row in run.history:
        total += row["bytes_up"] + row["bytes_down"]
        if "global_acc" in row:
            points.append((row["round"], row["global_acc"], total))
    return points


def at_bytes(run: RunRecord, budget: int) -> float | None:
    """The accuracy after the last round whose cumulative bytes are within `budget`."""
    within = [acc for _, acc, total in curve(run) if total <= budget]
    return within[-1] if within else None


def table(variants: dict[str, list[RunRecord]]) -> str:
    # equal bytes: every algorithm's accuracy within the lightest run's total traffic
    budget = min(curve(r)[-1][2] for runs in variants.values() for r in runs)
    lines = ["| algorithm | seeds | rounds | global_acc (last round) | best global_acc | MB up + down | "
             f"global_acc within {budget / 1e6:.0f} MB |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for label, runs in variants.items():
        def cell(values: list[float]) -> str:
            mean, std = mean_std(values)
            return f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if len(values) > 1 else "")
        last = cell([r.summary["global_acc"] for r in runs])
        best = cell([max(acc for _, acc, _ in curve(r)) for r in runs])
        megabytes = sum(curve(r)[-1][2] for r in runs) / len(runs) / 1e6
        equal = [at_bytes(r, budget) for r in runs]
        equal_cell = cell(equal) if all(v is not None for v in equal) else "—"
        lines.append(f"| {label} | {len(runs)} | {runs[0].summary['rounds']} | {last} | {best} | {megabytes:.1f} | {equal_cell} |")
    return "\n".join(lines)


def rounds_table(variants: dict[str, list[RunRecord]]) -> str:
    """global_acc after every round (first seed), with the cumulative MB."""
    labels = list(variants)
    curves = {label: {r: (acc, total) for r, acc, total in curve(variants[label][0])} for label in labels}
    rounds = sorted(set().union(*(c.keys() for c in curves.values())))
    lines = ["| round | " + " | ".join(labels) + " |", "| --- |" + " --- |" * len(labels)]
    for r in rounds:
        cells = [f"{100 * curves[l][r][0]:.2f} ({curves[l][r][1] / 1e6:.0f} MB)" if r in curves[l] else "—" for l in labels]
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", choices=("fashion_mnist", "faces"))
    parser.add_argument("--budget", choices=("cpu", "full"), default="cpu")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--only", nargs="*", choices=[e[0] for e in ENTRIES], help="run only these entries")
    parser.add_argument("--out", help="default: runs/bench-fedma-DATASET-BUDGET")
    args = parser.parse_args()

    out = Path(args.out or f"runs/bench-fedma-{args.dataset}-{args.budget}")
    budget = CPU_BUDGET + CPU_DATASET[args.dataset] if args.budget == "cpu" else []
    variants = {}
    for key, label, overrides in ENTRIES:
        if args.only and key not in args.only:
            continue
        runs = []
        for seed in range(args.seeds):
            run_overrides = [*budget, *overrides, f"seed={seed}", f"name={key}-seed{seed}", f"output_dir={out}",
                             f"logging.wandb.group=bench-fedma-{args.dataset}-{args.budget}", "logging.progress=false"]
            run_dir, _ = complete(f"fedma_{args.dataset}", run_overrides)
            runs.append(read_run_dir(run_dir))
            s = runs[-1].summary
            print(f"{label}: global_acc {s['global_acc']:.4f} bytes {s['bytes_up'] + s['bytes_down']} "
                  f"({s['seconds']:.0f}s)", flush=True)
        variants[label] = runs
    text = table(variants) + "\n\n" + rounds_table(variants)
    atomic_write_text(out / "table.md", text + "\n")
    print(text)
    print(f"wrote {out / 'table.md'}")


if __name__ == "__main__":
    main()
