"""Personalized evaluation: each client's own model on its own local test split.

A personalized FL method is judged by how well each client's personalized model
serves that client: FedPer's shared body with the client's own head, Ditto's
personal model, Per-FedAvg's global model after a few adaptation steps on the
client's training data. Each is scored on that client's local test split only,
never on another client's or on the server's test set. The mean over clients
(`personal_acc`) hides the clients a method fails, so the mean of the worst 10%
(`personal_acc_p10`) is reported beside it, and so is the mean over clients of
the personalized model's macro-F1 (`personal_f1_macro`), which a personal model
that ignores a client's rare classes lowers where accuracy hides it. The mean
weighs a client of 14 test images as much as one of 1,789; `personal_acc_pooled`
is the accuracy over all clients' test samples pooled, the figure PFLlib reports.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from fedssl.algorithms.base import LabeledBatch
from fedssl.evaluation.metrics import mean_acc, pooled_acc
from fedssl.data.tensors import client_seed, cycle_batches

WORST_SHARE = 0.1  # personal_acc_p10: the worst 10% of clients


def labeled_batches(images: torch.Tensor, labels: torch.Tensor, indices: np.ndarray, batch_size: int,
                    seed: int, client_id: int, steps: int, *, drop_last: bool) -> Iterator[LabeledBatch]:
    """`steps` shuffled mini-batches of the pooled `indices` (none if there are none),
    cut as training cuts them (`drop_last`: `train.drop_last`), drawn from (seed,
    client) alone, so every evaluation adapts on the same batches and a resumed run
    scores exactly as an uninterrupted one. Round 0 never trains, so its seed
    stream is free for this."""
    if len(indices) == 0:
        return
    rng = np.random.default_rng(client_seed(seed, 0, client_id))
    stream = cycle_batches(indices, batch_size, rng, drop_last=drop_last)
    for _ in range(steps):
        index = torch.from_numpy(next(stream)).to(labels.device)
        yield images[index], labels[index]


def worst_share_mean(values: Sequence[float], share: float = WORST_SHARE) -> float:
    """Mean of the lowest `share` of `values` (at least one value); NaN when empty."""
    if not len(values):
        return float("nan")
    count = max(1, math.ceil(share * len(values)))
    return float(np.mean(sorted(values)[:count]))


def personal_metrics(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """`personal_acc` (mean over clients of their personalized model's accuracy on
    their own local test split), `personal_acc_pooled` (that accuracy over all
    their test samples pooled), `personal_acc_p10` (the mean over the worst 10%
    of clients) and `personal_f1_macro` (mean over clients of the personalized
    model's macro-F1 on the client's split), from per-client rows with
    `personal_acc`, `personal_f1` and `test_samples`. Clients without a local test
    split do not count."""
    tested = [row for row in rows if row["test_samples"]]
    return {"personal_acc": mean_acc(tested, "personal_acc"), "personal_acc_pooled": pooled_acc(tested, "personal_acc"),
            "personal_acc_p10": worst_share_mean([row["personal_acc"] for row in tested]),
            "personal_f1_macro": mean_acc(tested, "personal_f1")}


def personal_summary(final: dict[str, Any], history: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The final round's personalized metrics, and beside them, labelled as such,
    the best evaluated round's `personal_acc` and which round that was."""
    summary = {key: final[key] for key in ("personal_acc", "personal_acc_pooled", "personal_acc_p10", "personal_f1_macro")
               if key in final}
    scored = [m for m in history if isinstance(m.get("personal_acc"), (int, float)) and math.isfinite(m["personal_acc"])]
    if scored:
        best = max(scored, key=lambda m: m["personal_acc"])
        summary |= {"personal_acc_best": best["personal_acc"], "personal_acc_best_round": best["round"]}
    return summary
