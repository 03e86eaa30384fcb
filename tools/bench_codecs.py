"""Communication benchmark: FedAvg with each uplink codec at equal rounds (accuracy
against cumulative uplink bytes), and with a lossy uplink at several packet-loss
rates for each server strategy (accuracy against the loss rate).

    OMP_NUM_THREADS=1 python tools/bench_codecs.py [--part codecs losses] [--datasets fashion_mnist faces]
        [--codecs dense q1 ...] [--loss-datasets faces] [--seeds 0 1] [--out DIR]

Every run is FedAvg on the same partition and budget (below: `SETTINGS`); only the
link differs. Finished runs are kept and killed ones resumed. A run that stops (a
round left without a usable update, as when a lossy link drops every update) is
shown at its last evaluated round, with the reason. Writes OUT/codecs.md,
OUT/losses.md, OUT/codecs.png and OUT/losses.png; BENCHMARKS.md records them with
the command.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from fedssl.errors import UserError
from fedssl.io import atomic_write, atomic_write_text
from fedssl.launch import complete
from fedssl.tracking.run_logger import read_metrics

# One CPU budget for every run: FedAvg CNN, 10 clients, 5 per round, 20 rounds of 10 local steps
# (the dataset's settings below come after, and may override these).
COMMON = ["algorithm.name=fedavg", "model.name=fedavg_cnn", "federation.clients=10", "federation.clients_per_round=5",
          "federation.rounds=20", "federation.evaluation.eval_every=5", "train.local_steps=10", "train.batch_size=32",
          "train.optimizer=sgd", "train.lr=0.05", "train.momentum=0.0", "logging.progress=false"]
SETTINGS = {
    "fashion_mnist": ("fedavg_fashion_mnist", ["data.partition.scheme=dirichlet", "data.partition.alpha=0.5",
                                               "data.partition.local_test_fraction=0.05"]),
    # the faces learn too slowly without momentum for 20 rounds to say anything (0.22 at 7 classes)
    "faces": ("quickstart", ["data.source=synthetic_faces", "data.num_samples=6000", "data.num_identities=30",
                             "data.image_size=28", "data.channels=1", "data.partition.scheme=natural",
                             "data.partition.local_test_fraction=0.1", "train.momentum=0.9"]),
}
# (key, label, uplink codecs as a recipe value)
CODECS = [
    ("dense", "dense float32 (no codec)", None),
    ("q8", "quantize 8 bits", "[{name: quantize, bits: 8}]"),
    ("hq2", "hadamard + quantize 2 bits", "[{name: hadamard}, {name: quantize, bits: 2}]"),
    ("q1", "quantize 1 bit", "[{name: quantize, bits: 1}]"),
    ("hq1", "hadamard + quantize 1 bit", "[{name: hadamard}, {name: quantize, bits: 1}]"),
    ("sub10", "subsample 10%", "[{name: subsample, fraction: 0.1}]"),
    ("mask10", "random mask 10%", "[{name: mask, fraction: 0.1}]"),
    ("lr4", "low rank 4", "[{name: low_rank, rank: 4}]"),
    ("topk1", "top-1% + error feedback", "[{name: topk, fraction: 0.01}]"),
    ("topk2q8", "top-2% + error feedback, values at 8 bits", "[{name: topk, fraction: 0.02}, {name: quantize, bits: 8}]"),
    ("hs50q1", "hadamard + subsample 50% + quantize 1 bit",
     "[{name: hadamard}, {name: subsample, fraction: 0.5}, {name: quantize, bits: 1}]"),
]
LOSSES = [0.0, 0.01, 0.05, 0.1, 0.3, 0.5]  # per attempt; one retransmission makes it p^2 for good
STRATEGIES = ["drop", "mean", "fill"]
CHANNEL = ["federation.uplink.channel.packet_bytes=1024", "federation.uplink.channel.retransmissions=1"]


def run(recipe: str, overrides: list[str], out: Path, name: str) -> tuple[list[dict], str]:
    """Complete one run; its evaluated rounds and a note (why it stopped, if it did)."""
    note = ""
    try:
        complete(recipe, [*overrides, f"name={name}", f"output_dir={out}", "logging.wandb.mode=disabled"])
    except UserError as error:  # e.g. a round with no usable update: the run stopped
        note = f"stopped: {str(error).split(' (')[0]}"
    metrics = read_metrics(out / name / "metrics.jsonl") if (out / name / "metrics.jsonl").is_file() else []
    return metrics, note


def curve(metrics: list[dict]) -> list[tuple[int, float]]:
    """(cumulative uplink bytes, global accuracy) at every evaluated round."""
    total, points = 0, []
    for m in metrics:
        total += m["bytes_up"]
        if "global_acc" in m:
            points.append((total, m["global_acc"]))
    return points


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def bench_codecs(datasets: list[str], keys: list[str] | None, seeds: list[int], out: Path) -> dict[str, dict[str, list]]:
    rows = ["| dataset | uplink codec | uplink MB / round | reduction vs dense | final global_acc (mean over seeds) "
            "| per seed | change vs dense (points) |", "| --- |" + " --- |" * 6]
    curves: dict[str, dict[str, list]] = {}
    for dataset in datasets:
        recipe, data = SETTINGS[dataset]
        dense_bytes, dense_acc = None, None
        for key, label, codecs in CODECS:
            if keys and key not in keys and key != "dense":
                continue
            accs, per_round, notes = [], [], []
            for seed in seeds:
                link = [f"federation.uplink.codecs={codecs}"] if codecs else []
                metrics, note = run(recipe, [*COMMON, *data, *link, f"seed={seed}"], out, f"{dataset}-{key}-s{seed}")
                points = curve(metrics)
                if seed == seeds[0]:
                    curves.setdefault(dataset, {})[label] = points
                if points:
                    accs.append(points[-1][1])
                per_round += [m["bytes_up"] for m in metrics]
                notes += [note] if note else []
            up = mean(per_round)
            dense_bytes = dense_bytes or up
            acc = mean(accs)
            dense_acc = acc if dense_acc is None else dense_acc
            rows.append(f"| {dataset} | {label} | {up / 1e6:.4f} | {dense_bytes / up:.2f}x | {acc:.4f} | "
                        f"{' / '.join(f'{a:.4f}' for a in accs)} | {100 * (acc - dense_acc):+.2f} |"
                        + (f" {'; '.join(notes)}" if notes else ""))
            print(rows[-1], flush=True)
    atomic_write_text(out / "codecs.md", "\n".join(rows) + "\n")
    return curves


def bench_losses(datasets: list[str], losses: list[float], seeds: list[int], out: Path) -> dict[str, dict[str, list]]:
    rows = ["| dataset | strategy | packet loss rate | final global_acc (mean over seeds) | packets lost / sent "
            "| coordinate participation: mean, lowest | dropped updates | note |", "| --- |" + " --- |" * 7]
    points: dict[str, dict[str, list]] = {}
    for dataset in datasets:
        recipe, data = SETTINGS[dataset]
        for strategy in STRATEGIES:
            for loss in losses:
                if loss == 0 and strategy != STRATEGIES[0]:  # a perfect link is no channel, whatever the strategy
                    points.setdefault(dataset, {}).setdefault(strategy, []).extend(points[dataset][STRATEGIES[0]][:1])
                    continue
                accs, lost, sent, share, lowest, dropped, notes = [], 0, 0, [], [], 0, []
                for seed in seeds:
                    channel = [*CHANNEL, f"federation.uplink.channel.loss={loss}",
                               f"federation.uplink.channel.strategy={strategy}"]
                    metrics, note = run(recipe, [*COMMON, *data, *channel, f"seed={seed}"], out,
                                        f"{dataset}-loss{loss}-{strategy if loss else 'any'}-s{seed}")
                    evaluated = [m["global_acc"] for m in metrics if "global_acc" in m]
                    if evaluated and not note:
                        accs.append(evaluated[-1])
                    lost += sum(m.get("packets_lost", 0) for m in metrics)
                    sent += sum(m.get("packets_sent", 0) for m in metrics)
                    share += [m["coordinate_participation_mean"] for m in metrics if "coordinate_participation_mean" in m]
                    lowest += [m["coordinate_participation_min"] for m in metrics if "coordinate_participation_min" in m]
                    dropped += sum(m["dropped_clients"] for m in metrics)
                    notes += [note] if note else []
                acc = mean(accs)
                # the mean over rounds of each round's mean over coordinates; the lowest coordinate of any round
                participation = f"{mean(share):.4f}, {min(lowest):.2f}" if share else "—"
                rows.append(f"| {dataset} | {strategy if loss else 'any (a perfect link)'} | {loss:g} | {acc:.4f} | {lost} / {sent} | {participation} | "
                            f"{dropped} | {'; '.join(sorted(set(notes)))} |")
                print(rows[-1], flush=True)
                if accs:
                    points.setdefault(dataset, {}).setdefault(strategy, []).append((loss, acc))
    atomic_write_text(out / "losses.md", "\n".join(rows) + "\n")
    return points


def plot(curves: dict[str, dict[str, list]], path: Path, xlabel: str, log_x: bool) -> None:
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6 * len(curves), 4.5))
    FigureCanvasAgg(figure)
    for i, (dataset, series) in enumerate(curves.items()):
        axes = figure.add_subplot(1, len(curves), i + 1)
        colors = matplotlib.colormaps["tab20"].colors  # more lines than the default cycle's 10 colors
        for (label, points), color in zip(series.items(), colors[::2] + colors[1::2]):
            if points:
                axes.plot([x for x, _ in points], [y for _, y in points], marker="o", markersize=3, label=label,
                          color=color)
        if log_x:
            axes.set_xscale("log")
        axes.set_title(dataset)
        axes.set_xlabel(xlabel)
        axes.set_ylabel("global accuracy")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    figure.tight_layout()
    atomic_write(path, lambda file: figure.savefig(file, format="png", dpi=110))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--codecs", nargs="*", help="only these codecs (keys of CODECS; dense always runs)")
    parser.add_argument("--loss-datasets", nargs="*", default=["faces"], choices=list(SETTINGS))
    parser.add_argument("--losses", nargs="*", type=float, default=LOSSES)
    parser.add_argument("--seeds", nargs="*", type=int, default=[0])
    parser.add_argument("--part", nargs="*", default=["codecs", "losses"], choices=["codecs", "losses"])
    parser.add_argument("--out", default="runs/bench-codecs")
    args = parser.parse_args()
    out = Path(args.out)
    if "codecs" in args.part:
        curves = bench_codecs(args.datasets, args.codecs, args.seeds, out)
        plot(curves, out / "codecs.png", "cumulative uplink bytes", log_x=True)
    if "losses" in args.part:
        points = bench_losses(args.loss_datasets, args.losses, args.seeds, out)
        plot(points, out / "losses.png", "packet loss rate (1 retransmission)", log_x=False)
    (out / "done.json").write_text(json.dumps(vars(args)))


if __name__ == "__main__":
    main()
