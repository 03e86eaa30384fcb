"""Run the personalization recipes of one dataset on one partition and budget, then
write a markdown table (personal_acc, personal_acc_p10, global_acc, ...) and a PNG.

    python tools/bench_personal.py faces [--budget cpu|full] [--seeds 1] [--only fedavg fedper ...] [--out DIR]

Every algorithm runs on the same clients and the same local test splits, so FedAvg's
`personal_acc` (its global model on each client's own test split) is the baseline the
personalized algorithms must beat. `--budget full` runs the recipes as written (a
GPU's budget); `cpu` applies the reduced budget below, which fits a 2-core CPU.
Finished runs are kept, so a killed benchmark continues where it stopped. Writes
OUT/table.md and OUT/personal_acc.png; BENCHMARKS.md records them with the command.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from fedssl.io import atomic_write, atomic_write_text
from fedssl.launch import complete
from fedssl.tracking.compare import curve, mean_std
from fedssl.tracking.runs import RunRecord, read_run_dir

# Entries: (key for --only, label, recipe stem without the dataset suffix, batch parts):
# Per-FedAvg cuts each batch into D and D' (and D'' for the Hessian-free variant),
# so its batch is 2 (3) times the others'.
ENTRIES = [
    ("fedavg", "FedAvg", "personal_fedavg", 1),
    ("fedper", "FedPer", "personal_fedper", 1),
    ("fedrep", "FedRep", "personal_fedrep", 1),
    ("fedbn", "FedBN", "personal_fedbn", 1),
    ("ditto", "Ditto", "personal_ditto", 1),
    ("perfedavg", "Per-FedAvg (FO)", "personal_perfedavg", 2),
    ("perfedavg_hf", "Per-FedAvg (HF)", "personal_perfedavg_hf", 3),
    ("reptile", "Reptile", "personal_reptile", 1),
    ("mocha", "MOCHA", "personal_mocha", 1),
    ("mocha_independent", "MOCHA, Omega fixed at I/m", "personal_mocha", 1),
]
# Entries that run a recipe with settings of their own: MOCHA with Omega never
# updated from I/m is each client training alone (with weight decay lambda m), the
# baseline that tells what the learned coupling adds.
ENTRY_OVERRIDES = {"mocha_independent": ["algorithm.mocha.omega_every=0"]}
# Budgets that fit a 2-core CPU, as overrides; "{batch}" is 16 (faces) or 10
# (Fashion-MNIST) times the entry's batch parts. Faces: 20 people, one client
# each, all taking part every round, at 24x24 pixels, 250 images each (a fifth to
# the server's test set, then 150 to train and 50 to test locally), one local
# epoch in batches of 16, 30 rounds, evaluated every 5. Fashion-MNIST: PFLlib's
# 20 clients and setting, 3 rounds.
CPU_BUDGETS = {
    "faces": ["data.num_identities=20", "federation.clients=20", "federation.clients_per_round=20",
              "data.num_samples=5000", "data.image_size=24", "train.batch_size={batch}",
              "federation.rounds=30", "federation.eval_every=5", "algorithm.meta.adapt_steps={adapt}"],
    "fashion_mnist": ["federation.rounds=3"],
}
BATCH = {"faces": 16, "fashion_mnist": 10}
# Reptile adapts for one local epoch (150 images in batches of 16); Per-FedAvg takes
# the one step it was meta-trained for.
ADAPT_STEPS = {"reptile": 10}
METRICS = ("personal_acc", "personal_acc_p10", "global_acc", "client_acc_mean", "personal_acc_best", "seconds")


def table(variants: dict[str, list[RunRecord]]) -> str:
    """Markdown: one row per algorithm, the mean (± std over seeds) of each final metric."""
    lines = ["| algorithm | seeds | " + " | ".join(METRICS) + " |", "| --- | --- |" + " --- |" * len(METRICS)]
    for label, runs in variants.items():
        cells = []
        for metric in METRICS:
            values = [r.summary[metric] for r in runs if isinstance(r.summary.get(metric), (int, float))]
            if not values:
                cells.append("—")
                continue
            mean, std = mean_std(values)
            cells.append(f"{mean:.1f}" if metric == "seconds" else f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if len(runs) > 1 else ""))
        lines.append(f"| {label} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(variants: dict[str, list[RunRecord]], path: Path) -> None:
    """PNG: personal_acc against round (left) and the final personal_acc, its worst-10%
    mean and the global model's accuracy per algorithm (right)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 4.5))
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    for label, runs in variants.items():
        rounds, mean, _ = curve(runs, "personal_acc")
        left.plot(rounds, mean, label=label)
    left.set_xlabel("round")
    left.set_ylabel("personal_acc (own local test split)")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    labels = list(variants)
    x = np.arange(len(labels))
    for offset, metric in zip((-0.27, 0.0, 0.27), ("personal_acc", "personal_acc_p10", "global_acc")):
        values = [np.mean([r.summary.get(metric) or 0.0 for r in variants[label]]) for label in labels]
        right.bar(x + offset, values, width=0.27, label=metric)
    right.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
    right.set_ylabel("accuracy, final round")
    right.grid(alpha=0.3, axis="y")
    right.legend(fontsize=8)
    figure.tight_layout()
    atomic_write(path, lambda file: figure.savefig(file, format="png", dpi=110))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", choices=sorted(CPU_BUDGETS))
    parser.add_argument("--budget", choices=("cpu", "full"), default="cpu")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--only", nargs="*", choices=[e[0] for e in ENTRIES], help="run only these entries")
    parser.add_argument("--out", help="default: runs/bench-personal-DATASET-BUDGET")
    args = parser.parse_args()

    out = Path(args.out or f"runs/bench-personal-{args.dataset}-{args.budget}")
    budget = CPU_BUDGETS[args.dataset] if args.budget == "cpu" else []
    variants = {}
    for key, label, stem, parts in ENTRIES:
        if args.only and key not in args.only:
            continue
        extra = [o.format(batch=BATCH[args.dataset] * parts, adapt=ADAPT_STEPS.get(key, 1)) for o in budget]
        extra += ENTRY_OVERRIDES.get(key, [])
        runs = []
        for seed in range(args.seeds):
            overrides = [*extra, f"seed={seed}", f"name={key}-seed{seed}", f"output_dir={out}",
                         f"logging.wandb.group=bench-personal-{args.dataset}-{args.budget}", "logging.progress=false"]
            run_dir, _ = complete(f"{stem}_{args.dataset}", overrides)
            runs.append(read_run_dir(run_dir))
            s = runs[-1].summary
            print(f"{label}: personal_acc {s['personal_acc']:.4f} p10 {s['personal_acc_p10']:.4f} "
                  f"global_acc {s['global_acc']:.4f} ({s['seconds']:.0f}s)", flush=True)
        variants[label] = runs
    text = table(variants)
    atomic_write_text(out / "table.md", text + "\n")
    plot(variants, out / "personal_acc.png")
    print(text)
    print(f"wrote {out / 'table.md'} and {out / 'personal_acc.png'}")


if __name__ == "__main__":
    main()
