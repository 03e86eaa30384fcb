"""Run a named set of semi-supervised recipes on one partition and budget, then
write a markdown table and accuracy curves (one line per recipe).

    python tools/bench_ssl.py faces [--budget cpu|full] [--seeds 1] [--set KEY=VALUE ...] [--out runs/bench-faces]

`--budget full` runs the recipes as written (meant for a GPU); `cpu` applies the
reduced budget below, which fits a 2-core CPU. `--set` adds recipe overrides to
every run, after the budget (`--set federation.rounds=3 data.augment_backend=albumentations`).
Finished runs are kept, so a killed benchmark continues where it stopped. The table is written to OUT/table.md and the
curves to OUT/global_acc.png; BENCHMARKS.md records them with the command and machine.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedssl.io import atomic_write_text
from fedssl.launch import complete
from fedssl.tracking.compare import comparison_table, plot_curves
from fedssl.tracking.runs import read_run_dir

ALGORITHMS = ("supervised_only", "fixmatch", "fedprox_fixmatch", "fedmatch_client", "fedmatch_server", "semifl")


def recipes(dataset: str) -> list[tuple[str, str, list[str]]]:
    """(label, recipe, extra overrides) of every semi-supervised recipe of a dataset."""
    return [(f"ssl_{a}_{dataset}", f"ssl_{a}_{dataset}", []) for a in ALGORITHMS]


SETS = {
    "faces": recipes("faces") + [
        # The lower bound at FixMatch's number of SGD steps (one pass over a client's
        # unlabeled data in batches of 3 x 32), so that more steps alone cannot win.
        ("ssl_supervised_only_faces_step_matched", "ssl_supervised_only_faces", ["train.local_steps=8"]),
        ("ssl_flexmatch_faces", "ssl_fixmatch_faces", ["algorithm.ssl.threshold=flexmatch"]),
    ],
    "fashion_mnist": recipes("fashion_mnist") + [
        # FedMatch labels-at-server's server epoch alone (FedAvg: the clients hold no
        # labels, so only the server's 1,000 labels train): what the unlabeled clients add.
        ("ssl_supervised_only_server_fashion_mnist", "ssl_fedmatch_server_fashion_mnist", ["algorithm.name=fedavg"]),
    ],
}
# Budgets that fit a 2-core CPU in about an hour per set (when nothing else runs).
CPU_BUDGETS = {
    "faces": ["federation.rounds=30"],
    "fashion_mnist": ["federation.rounds=10"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("set", choices=sorted(SETS))
    parser.add_argument("--budget", choices=("cpu", "full"), default="cpu")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--only", nargs="*", help="run only these entries (labels) of the set")
    parser.add_argument("--set", nargs="*", default=[], dest="overrides", help="recipe overrides for every run")
    parser.add_argument("--out", help="default: runs/bench-SET-BUDGET")
    args = parser.parse_args()

    out = Path(args.out or f"runs/bench-{args.set}-{args.budget}")
    budget = CPU_BUDGETS[args.set] if args.budget == "cpu" else []
    variants = {}
    for label, recipe, extra in SETS[args.set]:
        if args.only and label not in args.only:
            continue
        runs = []
        for seed in range(args.seeds):
            overrides = [*budget, *args.overrides, *extra, f"seed={seed}", f"name={label}-seed{seed}", f"output_dir={out}",
                         f"logging.wandb.group=bench-{args.set}-{args.budget}", "logging.progress=false"]
            run_dir, _ = complete(recipe, overrides)
            runs.append(read_run_dir(run_dir))
            print(f"{run_dir.name}: global_acc {runs[-1].summary['global_acc']:.4f}", flush=True)
        variants[label] = runs
    table = comparison_table(variants)
    atomic_write_text(out / "table.md", table + "\n")
    plot_curves(variants, out / "global_acc.png")
    print(table)
    print(f"wrote {out / 'table.md'} and {out / 'global_acc.png'}")


if __name__ == "__main__":
    main()
