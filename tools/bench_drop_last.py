"""Train on each pass's last partial batch or drop it (`train.drop_last`): one recipe,
both ways, every client's personalized accuracy at every round.

    python tools/bench_drop_last.py [--recipe personal_ditto_fashion_mnist] [--seed 4242] [--rounds 5]
                                    [--drop-last false true] [--out runs/bench-drop-last]
    python tools/bench_drop_last.py --report [--out ...]   # the table of what the runs wrote

On fedssl's Dir(0.1) Fashion-MNIST partition at seed 4242, clients 3, 6, 10 and 14
(561, 1,101, 2,561 and 811 training images) end every pass of batch 10 with a
one-image step, and Ditto's personal accuracy of client 10 swung from 0.96 to 0.40
in rounds where that image was of a class it rarely sees (issue 20). Each variant appends one JSON line per
round to OUT/drop_last-VALUE.jsonl (`personal_acc`, `personal_acc_pooled` and each
client's `personal_acc`), so two variants can run as two processes side by side,
and a killed one keeps the rounds it finished. The report names the clients whose
pass ends on one image and sets their accuracy per round beside the rest's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from fedssl.config.load import load_recipe
from fedssl.engine.federation import Federation


def run(recipe: str, seed: int, rounds: int, drop_last: bool, out: Path) -> None:
    cfg = load_recipe(recipe, [f"seed={seed}", f"federation.rounds={rounds}", f"train.drop_last={drop_last}",
                               "logging.wandb.mode=disabled", "logging.progress=false"])
    federation = Federation.build(cfg)
    sizes = {c.client_id: len(c.labeled) for c in federation.data.clients}
    path = out / f"drop_last-{str(drop_last).lower()}.jsonl"
    path.write_text("")
    state = federation.initial_state()
    for round_index in range(1, rounds + 1):
        state, _ = federation.fit_round(round_index, state)
        metrics, rows = federation.evaluate(state)
        line = {"round": round_index, "drop_last": drop_last, "batch_size": cfg.train.batch_size,
                **{k: metrics[k] for k in ("personal_acc", "personal_acc_pooled", "global_acc")},
                "clients": {row["client"]: {"acc": row["personal_acc"], "test_samples": row["test_samples"],
                                            "train": sizes[row["client"]]} for row in rows}}
        with path.open("a") as file:
            file.write(json.dumps(line) + "\n")
        print(f"drop_last={drop_last} round {round_index}: personal_acc {metrics['personal_acc']:.4f} "
              f"pooled {metrics['personal_acc_pooled']:.4f}", flush=True)


def report(out: Path) -> str:
    """Markdown: per round and variant, the mean and pooled personal accuracy, each
    one-image client's accuracy, and the mean over the other clients."""
    variants = {p.stem: [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
                for p in sorted(out.glob("drop_last-*.jsonl"))}
    first = next(iter(variants.values()))[0]
    batch = first["batch_size"]
    one_image = sorted(int(c) for c, row in first["clients"].items() if row["train"] % batch == 1)
    header = ["variant", "round", "personal_acc", "personal_acc_pooled",
              *[f"client {c} ({first['clients'][str(c)]['train']} train)" for c in one_image], "other clients (mean)"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for name, history in variants.items():
        for line in history:
            others = [row["acc"] for c, row in line["clients"].items() if int(c) not in one_image and row["test_samples"]]
            cells = [name, str(line["round"]), f"{100 * line['personal_acc']:.2f}", f"{100 * line['personal_acc_pooled']:.2f}",
                     *[f"{100 * line['clients'][str(c)]['acc']:.2f}" for c in one_image], f"{100 * np.mean(others):.2f}"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="personal_ditto_fashion_mnist")
    parser.add_argument("--seed", type=int, default=4242)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--drop-last", nargs="*", choices=("false", "true"), default=["false", "true"])
    parser.add_argument("--report", action="store_true", help="only print the table of the runs in OUT")
    parser.add_argument("--out", default="runs/bench-drop-last")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.report:
        for value in args.drop_last:
            run(args.recipe, args.seed, args.rounds, value == "true", out)
    text = report(out)
    (out / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
