"""Comparison of runs: variants averaged over seeds, as a markdown table and a plot.

Runs are variants of one another when their resolved configs agree on everything
but the seed and the bookkeeping (name, output directory, logging). A variant is
labelled by its algorithm and the keys on which the variants differ. The table
ranks the variants by the mean over seeds of one final metric, best first.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fedssl.errors import UserError
from fedssl.io import atomic_write
from fedssl.tracking.runs import RunRecord

# Final metrics a table shows, in this order, where any run has them.
METRICS = ("global_acc", "global_f1_macro", "personal_acc", "personal_acc_pooled", "personal_acc_p10", "personal_f1_macro",
           "client_acc_mean", "client_acc_pooled", "bytes_up", "bytes_down", "epsilon", "seconds")
# Final metrics where lower is better; every other metric ranks highest first.
LOWER_IS_BETTER = ("loss", "bytes", "seconds", "epsilon", "dropped")
IGNORED = ("seed", "name", "output_dir", "logging")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def variant_key(record: RunRecord) -> tuple[tuple[str, str], ...]:
    """The config without seed and bookkeeping, as sorted (key, JSON value) pairs."""
    flat = flatten(record.config)
    return tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in flat.items() if k.split(".")[0] not in IGNORED))


def shown(key: tuple[tuple[str, str], ...], name: str) -> str:
    value = dict(key).get(name)
    return "-" if value is None else str(json.loads(value))


def group_variants(records: Sequence[RunRecord]) -> dict[str, list[RunRecord]]:
    """Label -> the runs (seeds) of that variant, in first-seen order."""
    by_key: dict[tuple, list[RunRecord]] = defaultdict(list)
    for record in records:
        by_key[variant_key(record)].append(record)
    keys = list(by_key)
    varying = sorted({k for key in keys for k, v in key if any(dict(other).get(k) != v for other in keys)})
    labels = {}
    for key in keys:
        details = [f"{k.rsplit('.', 1)[-1]}={shown(key, k)}" for k in varying if k != "algorithm.name"]
        labels[key] = " ".join([shown(key, "algorithm.name"), *details])
    return {labels[key]: by_key[key] for key in keys}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single run)."""
    array = np.asarray(values, dtype=float)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def format_cell(metric: str, values: Sequence[float]) -> str:
    """The mean of `values`, and their spread only when there are several: a single
    seed has none, and `± 0.0000` would read as seeds that agreed exactly."""
    mean, std = mean_std(values)
    spread = len(values) > 1
    if metric.startswith("bytes"):
        return f"{mean / 1e6:.2f}" + (f" ± {std / 1e6:.2f}" if spread else "") + " MB"
    digits = 1 if metric == "seconds" else 4
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if spread else "")


def lower_is_better(metric: str) -> bool:
    return any(word in metric for word in LOWER_IS_BETTER)


def rank_variants(variants: dict[str, list[RunRecord]], metric: str) -> dict[str, list[RunRecord]]:
    """`variants` ordered by the mean over their seeds of the final `metric`, best first
    (highest, or lowest for losses, bytes, seconds and epsilon); variants without it
    last. A metric only the rounds record (`train_loss`) leaves the order as it is.

    Raises:
        UserError: no run has `metric`, in its summary or its rounds (naming the
            summary's metrics).
    """
    runs = [r for members in variants.values() for r in members]
    means = {label: mean_std(values)[0] for label, members in variants.items()
             if (values := [r.summary[metric] for r in members if _finite(r.summary.get(metric))])}
    if not means and not any(_finite(row.get(metric)) for r in runs for row in r.history):
        known = sorted({k for r in runs for k, v in r.summary.items() if _finite(v)})
        raise UserError(f"--metric: no run has {metric!r} in its summary or rounds; "
                        f"their summaries have {', '.join(known)}")
    sign = 1 if lower_is_better(metric) else -1
    order = sorted(variants, key=lambda label: (label not in means, sign * means.get(label, 0.0)))
    return {label: variants[label] for label in order}


def comparison_table(variants: dict[str, list[RunRecord]], ranked_by: str | None = None) -> str:
    """Markdown: one row per variant, mean ± std over its seeds of each final metric
    (and of `ranked_by`, the metric the rows are ordered by, which comes first); the
    mean alone where a single seed has the metric (`format_cell`)."""
    def present(metric: str) -> bool:
        return any(_finite(r.summary.get(metric)) for runs in variants.values() for r in runs)

    metrics = [m for m in ([ranked_by] if ranked_by else []) + [m for m in METRICS if m != ranked_by] if present(m)]
    lines = ["| variant | seeds | " + " | ".join(metrics) + " |", "| --- | --- |" + " --- |" * len(metrics)]
    for label, runs in variants.items():
        cells = []
        for metric in metrics:
            values = [r.summary[metric] for r in runs if _finite(r.summary.get(metric))]
            cells.append(format_cell(metric, values) if values else "—")
        lines.append(f"| {label} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def curve(runs: Sequence[RunRecord], metric: str, x: str = "round") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rounds every run evaluated, with the mean and std over runs of `metric` there;
    with `x` other than round (e.g. sim_time, simulated seconds), its mean over runs
    at those rounds stands for the round."""
    per_run = [{row["round"]: (row.get(x), row[metric]) for row in r.history
                if _finite(row.get(metric)) and _finite(row.get(x))} for r in runs]
    rounds = sorted(set.intersection(*(set(p) for p in per_run))) if per_run else []
    values = np.array([[p[t][1] for t in rounds] for p in per_run], dtype=float).reshape(len(per_run), len(rounds))
    xs = np.array([[p[t][0] for t in rounds] for p in per_run], dtype=float).reshape(len(per_run), len(rounds))
    std = values.std(axis=0, ddof=1) if len(runs) > 1 else np.zeros(len(rounds))
    return xs.mean(axis=0), values.mean(axis=0), std


def check_axis(variants: dict[str, list[RunRecord]], x: str) -> None:
    """Refuse an x axis some runs never recorded: their curves would be empty, and
    the plot would silently leave them out (only runs with device profiles,
    `federation.system`, record simulated time).

    Raises:
        UserError: a run has no finite `x` in any round (naming how many and one).
    """
    if x == "round":
        return
    runs = [r for members in variants.values() for r in members]
    lacking = [r for r in runs if not any(_finite(row.get(x)) for row in r.history)]
    if lacking:
        why = ("simulated time is recorded only by runs with device profiles (federation.system)"
               if x == "sim_time" else f"their rounds have no {x}")
        raise UserError(f"--x {x}: {len(lacking)} of {len(runs)} runs never recorded {x}, e.g. {lacking[0].source} "
                        f"({why}); plot them against --x round")


def plot_curves(variants: dict[str, list[RunRecord]], path: Path, metric: str = "global_acc", x: str = "round") -> None:
    """PNG: `metric` against round (or `x`, e.g. sim_time), one line per variant, a band of ± one std over seeds.

    Raises:
        UserError: some run never recorded `x` (`check_axis`).
    """
    check_axis(variants, x)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for label, runs in variants.items():
        rounds, mean, std = curve(runs, metric, x)
        line, = axes.plot(rounds, mean, label=f"{label} (n={len(runs)})")
        axes.fill_between(rounds, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
    if x == "round":
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("simulated seconds" if x == "sim_time" else x)
    axes.set_ylabel(metric)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    atomic_write(path, lambda file: figure.savefig(file, format="png", dpi=120))
