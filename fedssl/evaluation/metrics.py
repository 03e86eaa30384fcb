"""Round metrics: training loss, pseudo-label quality and accuracy, kept apart by
kind of client (labeled, unlabeled, mixed)."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from fedssl.data.federated import ClientData
from fedssl.messages import Update

PSEUDO_LABEL_COUNTS = ("pl_seen", "pl_masked", "pl_correct")  # summed over clients, not averaged


def client_kind(client: ClientData) -> str:
    """labeled (labels only), unlabeled (no labels) or mixed; metrics keep them apart."""
    if len(client.labeled) and len(client.unlabeled):
        return "mixed"
    return "labeled" if len(client.labeled) else "unlabeled"


def round_metrics(updates: list[Update], kinds: Mapping[int, str]) -> dict[str, float]:
    """Training metrics of a round: mean loss and pseudo-label quality pooled over
    clients, overall and per kind of client, and the mean of what learners logged.
    `kinds` is read for the updates' clients only (a population's may be lazy)."""
    losses = [u.metrics["train_loss"] for u in updates if "train_loss" in u.metrics]
    metrics = {"train_loss": float(np.mean(losses)) if losses else float("nan"), "clients": len(updates)}
    groups = {"": updates} | {f"/{kind}": [u for u in updates if kinds[u.client_id] == kind] for kind in sorted({kinds[u.client_id] for u in updates})}
    for suffix, members in groups.items():
        seen = sum(u.metrics.get("pl_seen", 0) for u in members)
        masked = sum(u.metrics.get("pl_masked", 0) for u in members)
        if seen:
            metrics[f"pl_mask_rate{suffix}"] = masked / seen
            correct = sum(u.metrics.get("pl_correct", 0) for u in members)
            metrics[f"pl_acc{suffix}"] = correct / masked if masked else float("nan")
    # What learners logged (self.log, a client's mean over its round): each name's
    # mean over the clients that logged it, never in place of the metrics above.
    for name in sorted({name for u in updates for name in u.metrics} - set(PSEUDO_LABEL_COUNTS) - set(metrics)):
        metrics[name] = float(np.mean([u.metrics[name] for u in updates if name in u.metrics]))
    return metrics


def mean_acc(rows: list[dict[str, Any]], key: str = "acc") -> float:
    """The mean over clients with a local test split of their accuracy `key`: each
    client counts alike, whatever its split's size."""
    accs = [r[key] for r in rows if r["test_samples"]]
    return float(np.mean(accs)) if accs else float("nan")


def pooled_acc(rows: list[dict[str, Any]], key: str = "acc") -> float:
    """The accuracy `key` over every client's local test samples pooled: correct
    predictions summed over clients / test samples summed over clients, so a large
    split weighs more than a small one (PFLlib's definition, where `mean_acc` is
    the mean over clients). NaN without any test sample."""
    tested = [r for r in rows if r["test_samples"]]
    total = sum(r["test_samples"] for r in tested)
    if not total:
        return float("nan")
    # accuracy x samples is each client's count of correct predictions, a whole number
    return float(sum(round(r[key] * r["test_samples"]) for r in tested) / total)
