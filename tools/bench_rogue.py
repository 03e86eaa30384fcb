"""Rogue-client report: FedAvg with one rogue client among the five sampled each
round, boosted or sign-flipped at several scales, with and without the default
norm bound (`federation.robust.update_clip`, Sun et al. 2019), against the clean run.

    python tools/bench_rogue.py [--scales 2 10 100 990 1e30] [--seeds 0 1] [--settings off default] [--out DIR] [--threads 1]

The rogue is the lowest-numbered client of each round's cohort (so exactly one of
the five, a different person from round to round): it trains honestly, then sends
received + s x (trained - received), s = scale for a boosted update (model
replacement, Bagdasaryan et al. 2020) and s = -scale for a sign flip. "off" runs
with `federation.robust.update_clip.multiple=0`, fedssl's default before the bound (the
`federation.robust.max_update_ratio` drop alone); "default" with the schema's default;
"trimmed_mean" and "median" with that robust aggregator beside the default bound. The
recipe is the quickstart shrunk to 10 rounds (below), run once per seed (the seed
draws the partition, the cohorts and the rogue); the table gives the mean over
seeds (the dropped and clipped counts are summed over them). Finished runs are kept (their summary.json), so processes started with one
seed each fill the cache in parallel. A run that stops (every update of a round
non-finite) is shown as stopped, with the round it stopped in. Writes OUT/table.md;
BENCHMARKS.md records it.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import torch

from fedssl.algorithms.base import ALGORITHMS
from fedssl.algorithms.fedavg import FedAvg
from fedssl.config.load import load_recipe
from fedssl.errors import UserError
from fedssl.engine.run import run_federation
from fedssl.io import atomic_write_text
from fedssl.learners.supervised import SupervisedLearner
from fedssl.sampling import sample_cohort
from fedssl.tracking.run_logger import read_metrics

RECIPE = "recipes/quickstart.yaml"
# The quickstart at 10 rounds, smaller images and fewer of them; in process (the rogue
# algorithm is registered in this process only), no W&B, no progress bar.
BUDGET = ["federation.rounds=10", "data.num_samples=6000", "data.image_size=32", "federation.execution.workers=0",
          "logging.wandb.mode=disabled", "logging.progress=false", "algorithm.name=rogue_fedavg"]
SETTINGS = {"off": ["federation.robust.update_clip.multiple=0"], "default": [],
            "trimmed_mean": ["federation.robust.aggregator=trimmed_mean"], "median": ["federation.robust.aggregator=median"]}


class RogueLearner(SupervisedLearner):
    """An honest FedAvg client, except on the round's rogue: see the module docstring."""

    def __init__(self, model, cfg, factor: float, rogue_of_round):
        super().__init__(model, cfg)
        self.factor, self.rogue_of_round = factor, rogue_of_round

    def start_round(self, payload, context):
        super().start_round(payload, context)
        self.is_rogue = context.client_id == self.rogue_of_round(payload.round)
        self.received = payload.arrays

    def arrays(self, names):
        out = super().arrays(names)
        if not getattr(self, "is_rogue", False):  # the server's learner scores, it does not send
            return out
        return {n: self.received[n] + self.factor * (v - self.received[n]) if v.is_floating_point() else v
                for n, v in out.items()}


def rogue_fedavg(factor: float) -> type[FedAvg]:
    """FedAvg whose round's lowest-numbered sampled client sends factor x its update."""

    class RogueFedAvg(FedAvg):
        def make_learner(self, model):
            fed = self.cfg.federation
            first = lambda round_index: sample_cohort(fed.clients, fed.clients_per_round, self.cfg.seed, round_index)[0]
            return RogueLearner(model, self.cfg.train, factor, first)

    return RogueFedAvg


def run(name: str, factor: float, setting: str, out: Path, seed: int = 0) -> tuple[dict, str]:
    """One run (kept if finished): its summary, or its last evaluated round and where it stopped."""
    run_dir = out / name
    if (run_dir / "summary.json").is_file():
        return json.loads((run_dir / "summary.json").read_text()), ""
    ALGORITHMS._entries["rogue_fedavg"] = rogue_fedavg(factor)  # the registry's decorator refuses a second entry
    cfg = load_recipe(RECIPE, [*BUDGET, *SETTINGS[setting], f"seed={seed}", f"name={name}", f"output_dir={out}"])
    try:
        return run_federation(cfg, run_dir), ""
    except UserError as error:  # e.g. every update of a round non-finite: the run stopped
        rounds = read_metrics(run_dir / "metrics.jsonl")
        evaluated = [m for m in rounds if "global_acc" in m]
        return (evaluated[-1] if evaluated else {}), f"stopped in round {len(rounds) + 1}"


def fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", nargs="*", default=["2", "10", "100", "990", "1e30"])
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1])
    parser.add_argument("--settings", nargs="*", choices=list(SETTINGS), default=["off", "default"])
    parser.add_argument("--out", default="runs/bench-rogue")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    out = Path(args.out)
    attacks = [("clean", "none", 1.0), ("sign flip", "1", -1.0)]
    attacks += [(kind, scale, sign * float(scale)) for kind, sign in (("boosted", 1), ("sign flip", -1))
                for scale in args.scales]
    clean: dict[str, float] = {}
    rows = ["| attack | scale | " + " | ".join(f"{s}: global_acc | {s}: vs clean | {s}: dropped / clipped"
                                             for s in args.settings) + " |",
            "| --- | --- |" + " --- |" * 3 * len(args.settings)]
    for kind, scale, factor in attacks:
        cells = []
        for setting in args.settings:
            runs = [run(f"{setting}-{kind.replace(' ', '')}-{scale}-seed{seed}", factor, setting, out, seed)
                    for seed in args.seeds]
            stopped = [note for _, note in runs if note]
            if stopped:  # a stopped run has no final accuracy to average
                cells += ["stopped", "—", f"{len(stopped)} of {len(runs)} runs {', '.join(stopped)}"]
                continue
            acc = statistics.mean(summary["global_acc"] for summary, _ in runs)
            if kind == "clean":
                clean[setting] = acc
            dropped = sum(summary["dropped_clients"] for summary, _ in runs)
            clipped = sum(summary.get("clipped_clients", 0) for summary, _ in runs)
            cells += [fmt(acc), f"{100 * (acc - clean[setting]):+.1f}", f"{dropped} / {clipped}"]
        rows.append(f"| {kind} | {scale} | " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    atomic_write_text(out / "table.md", "\n".join(rows) + "\n")
    print(f"wrote {out / 'table.md'}")


if __name__ == "__main__":
    main()
