"""Privacy-utility report: recipes run at several user-level epsilons (DP-FedAvg),
then a markdown table and a PNG of accuracy against epsilon.

    python tools/bench_privacy.py [--budget cpu|full] [--only fixmatch fedper] [--epsilons inf 8 3 1] [--out DIR]

epsilon = inf is the recipe without DP (fixed-size client sampling); every finite
epsilon runs `privacy.mechanism=central` with `privacy.target_epsilon` (the noise
multiplier is calibrated to spend it over the run's rounds), Poisson client
sampling at rate clients_per_round / clients, a fixed clip and `privacy.delta`.
`--budget cpu` shrinks the recipes to fit a 2-core CPU (below); `full` runs them as
written. Finished runs are kept and killed ones resumed. A run that diverges (all of
a round's updates non-finite, which noise can cause) stops with a UserError; the
table then shows the last evaluated round and says where it stopped. Writes
OUT/table.md and OUT/privacy_utility.png; BENCHMARKS.md records them with the command.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from fedssl.errors import UserError
from fedssl.io import atomic_write, atomic_write_text
from fedssl.launch import complete
from fedssl.tracking.run_logger import read_metrics

# (key, label, recipe, metric to plot, CPU budget overrides)
ENTRIES = [
    ("fixmatch", "FedAvg-FixMatch, faces (10 clients, 5 per round)", "ssl_fixmatch_faces", "global_acc",
     ["data.num_samples=4000", "data.image_size=24", "federation.rounds=10"]),
    ("fedper", "FedPer, faces (20 clients, 10 per round)", "personal_fedper_faces", "personal_acc",
     ["data.num_identities=20", "federation.clients=20", "federation.clients_per_round=10", "data.num_samples=5000",
      "data.image_size=24", "train.batch_size=16", "federation.rounds=10"]),
]
# delta far below 1/clients (1/10 and 1/20 here); the clip is about the median norm
# of a client's delta in the first rounds of these recipes without DP (0.2-0.5).
PRIVACY = ["privacy.delta=0.001", "privacy.clip=0.25"]
METRICS = ("global_acc", "personal_acc", "client_acc_mean")


def run(recipe: str, overrides: list[str]) -> tuple[Path, dict, str]:
    """Complete one run; its directory, summary (or last evaluated round) and a note."""
    try:
        run_dir, _ = complete(recipe, overrides)
    except UserError as error:  # e.g. every update of a round non-finite: the run stopped
        name = next(o.split("=", 1)[1] for o in overrides if o.startswith("name="))
        out = next(o.split("=", 1)[1] for o in overrides if o.startswith("output_dir="))
        run_dir = Path(out) / name
        rounds = [m for m in read_metrics(run_dir / "metrics.jsonl") if "global_acc" in m]
        last = rounds[-1] if rounds else {}
        return run_dir, last, f"stopped in round {len(read_metrics(run_dir / 'metrics.jsonl')) + 1}: {str(error).split(' (')[0]}"
    import json

    return run_dir, json.loads((run_dir / "summary.json").read_text()), ""


def fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", choices=("cpu", "full"), default="cpu")
    parser.add_argument("--only", nargs="*", help="run only these entries (fixmatch, fedper)")
    parser.add_argument("--epsilons", nargs="*", default=["inf", "8", "3", "1"])
    parser.add_argument("--out", help="default: runs/bench-privacy-BUDGET")
    args = parser.parse_args()

    out = Path(args.out or f"runs/bench-privacy-{args.budget}")
    rows = ["| recipe | target epsilon | noise multiplier | epsilon spent | delta | global_acc | personal_acc "
            "| client_acc_mean | seconds | note |", "| --- |" + " --- |" * 9]
    points: dict[str, list[tuple[float, float, bool]]] = {}  # (epsilon, accuracy, finished)
    for key, label, recipe, metric, budget in ENTRIES:
        if args.only and key not in args.only:
            continue
        for eps in args.epsilons:
            private = [] if eps == "inf" else ["privacy.mechanism=central", f"privacy.target_epsilon={eps}", *PRIVACY]
            overrides = [*(budget if args.budget == "cpu" else []), *private, f"name={key}-eps{eps}",
                         f"output_dir={out}", f"logging.wandb.group=bench-privacy-{args.budget}",
                         "logging.progress=false"]
            run_dir, summary, note = run(recipe, overrides)
            rows.append(f"| {label} | {eps} | {fmt(summary.get('noise_multiplier'))} | "
                        f"{fmt(summary.get('epsilon', math.inf if eps == 'inf' else None), 2)} | "
                        f"{fmt(summary.get('delta'), 4)} | " + " | ".join(fmt(summary.get(m)) for m in METRICS)
                        + f" | {fmt(summary.get('seconds'), 0)} | {note} |")
            if isinstance(summary.get(metric), float):
                points.setdefault(f"{label}: {metric}", []).append((float(eps), summary[metric], not note))
            print(rows[-1], flush=True)
    table = "\n".join(rows)
    atomic_write_text(out / "table.md", table + "\n")
    plot(points, out / "privacy_utility.png")
    print(f"wrote {out / 'table.md'} and {out / 'privacy_utility.png'}")


def plot(points: dict[str, list[tuple[float, float, bool]]], path: Path) -> None:
    """Accuracy against epsilon (log scale; no DP drawn at the right edge); a run that
    stopped early is drawn hollow, at its last evaluated round."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    finite = [e for series in points.values() for e, _, _ in series if math.isfinite(e)]
    no_dp = 4 * max(finite) if finite else 1.0  # where "no DP" is drawn
    for label, series in points.items():
        series = sorted(series)
        x = [no_dp if math.isinf(e) else e for e, _, _ in series]
        line, = axes.plot(x, [a for _, a, _ in series], label=label)
        for xi, (_, a, finished) in zip(x, series):
            axes.plot([xi], [a], marker="o", color=line.get_color(), markerfacecolor=line.get_color() if finished else "white")
    axes.plot([], [], marker="o", color="gray", markerfacecolor="white", linestyle="none", label="stopped early (diverged)")
    axes.set_xscale("log")
    ticks = sorted(set(finite)) + [no_dp]
    axes.set_xticks(ticks, [f"{t:g}" for t in ticks[:-1]] + ["no DP"])
    axes.set_xlabel("user-level epsilon (delta = 1e-3)")
    axes.set_ylabel("final accuracy")
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    atomic_write(path, lambda file: figure.savefig(file, format="png", dpi=120))


if __name__ == "__main__":
    main()
