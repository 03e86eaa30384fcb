"""Few-shot FL on the synthetic faces: self-supervised pretraining + k-shot (fedaffect)
against supervised-only on the k labels, FixMatch and FedMatch, at k in {1, 5, 10},
on one partition and budget; writes a markdown table.

    OMP_NUM_THREADS=1 python tools/bench_fedaffect.py [--k 5 1 10] [--budget cpu|full] [--only LABEL ...]

Every variant runs on the same data, partition and held-out people (two of the ten
clients never train and are scored as unseen people, `unseen_acc`), for the same
rounds, with the same SGD steps per round where it can choose them (the step count
of a FixMatch round: one pass over a client's unlabeled images in batches of 3 x 32),
and every run reports the linear probe (`linear_acc`, k-shot: the probe is fitted on
the training clients' k labels per class). `--budget cpu` fits a 2-core CPU; `full`
runs the recipes' 30 rounds on all 10,000 images. Finished runs are kept, so a killed
benchmark continues where it stopped. OUT/table.md holds the table; BENCHMARKS.md
records it with the command and machine.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedssl.io import atomic_write_text
from fedssl.launch import complete
from fedssl.tracking.runs import read_run_dir

# What every variant shares: the held-out people and the metrics.
COMMON = ["federation.evaluation.holdout_clients=2", "federation.evaluation.linear_probe=true", "federation.evaluation.eval_every=5"]
STEPS = 8  # SGD steps of a FixMatch round on ssl_fixmatch_faces (765 unlabeled images / (3 x 32))
# A 2-core CPU: half the images (so a round's pass over them is 4 steps) and 20 rounds.
CPU_BUDGET = ["data.num_samples=5000", "federation.rounds=20", "algorithm.selfsup.pretrain_rounds=14"]
CPU_STEPS = 4


def variants(k: int, steps: int) -> list[tuple[str, str, list[str]]]:
    """(label, recipe, overrides) of the comparison at k labels per class per client."""
    labels = [f"data.labels.per_class={k}"]
    return [
        (f"supervised_only_k{k}", "ssl_supervised_only_faces", [*labels, f"train.local_steps={steps}"]),
        (f"fedaffect_byol_k{k}", "ssl_fedaffect_faces", [*labels, f"algorithm.selfsup.fewshot_steps={steps}"]),
        (f"fixmatch_k{k}", "ssl_fixmatch_faces", labels),
        (f"fedmatch_k{k}", "ssl_fedmatch_client_faces", labels),
        (f"fedaffect_byol_interleaved_k{k}", "ssl_fedaffect_faces",
         [*labels, "algorithm.selfsup.schedule=interleaved", "algorithm.selfsup.pretrain_rounds=0"]),
        (f"fedema_byol_k{k}", "ssl_fedema_faces", [*labels, f"algorithm.selfsup.fewshot_steps={steps}"]),
    ]


COLUMNS = ("global_acc", "linear_acc", "client_acc_mean", "unseen_acc", "unseen_global_acc", "seconds")


def table(rows: list[tuple[str, dict]]) -> str:
    lines = ["| variant | " + " | ".join(COLUMNS) + " |", "| --- |" + " --- |" * len(COLUMNS)]
    for label, summary in rows:
        cells = [f"{summary[c]:.0f}" if c == "seconds" else f"{summary.get(c, float('nan')):.3f}" for c in COLUMNS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, nargs="+", default=[5, 1, 10])
    parser.add_argument("--budget", choices=("cpu", "full"), default="cpu")
    parser.add_argument("--only", nargs="*", help="run only these variants (labels without the _k suffix)")
    parser.add_argument("--out", help="default: runs/bench-fedaffect-BUDGET")
    args = parser.parse_args()

    out = Path(args.out or f"runs/bench-fedaffect-{args.budget}")
    budget, steps = (CPU_BUDGET, CPU_STEPS) if args.budget == "cpu" else ([], STEPS)
    rows = []
    for k in args.k:
        for label, recipe, extra in variants(k, steps):
            if args.only and label.rsplit("_k", 1)[0] not in args.only:
                continue
            overrides = [*budget, *COMMON, *extra, f"name={label}", f"output_dir={out}",
                         f"logging.wandb.group=bench-fedaffect-{args.budget}", "logging.progress=false"]
            run_dir, _ = complete(recipe, overrides)
            summary = read_run_dir(run_dir).summary
            rows.append((label, summary))
            print(f"{label}: global_acc {summary['global_acc']:.4f} linear_acc {summary.get('linear_acc', float('nan')):.4f} "
                  f"unseen_acc {summary.get('unseen_acc', float('nan')):.4f}", flush=True)
    text = table(rows)
    atomic_write_text(out / "table.md", text + "\n")
    print(text)
    print(f"wrote {out / 'table.md'}")


if __name__ == "__main__":
    main()
