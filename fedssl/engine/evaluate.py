"""The evaluate stage: the global model on the server's test set, and each
client's global and personalized scores on its own local test split (through the
`Clients`: in this process or on the nodes that hold them)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fedssl.algorithms.aggregate import ServerState
from fedssl.engine.server import Server
from fedssl.evaluation.class_metrics import global_class_metrics
from fedssl.evaluation.metrics import mean_acc, pooled_acc
from fedssl.evaluation.personal import personal_metrics
from fedssl.evaluation.score import score
from fedssl.evaluation.unseen import linear_acc, unseen_metrics
from fedssl.sampling import evaluation_cohort



def evaluate(server: Server, state: ServerState, round_index: int = 0
             ) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """The global model on the server test set (accuracy, loss, macro-F1, per-class
    recall and the confusion matrix `global_confusion`, all from one pass), and
    each client's row (`Clients.score`): every client's, or with
    `federation.evaluation.eval_clients` a sample of the training clients drawn for
    `round_index` (and every held-out client). The metrics include what the evaluation cost and dropped
    (`bytes_down`, `bytes_up`, `dropped_clients`), for the round to add to its own."""
    weights = server.algorithm.global_weights(state)
    server.trainer.learner.load_arrays(weights)
    tested = score(server.model, server.test.images, server.test.labels)
    probe = {"linear_acc": linear_probe(server)} if server.cfg.federation.evaluation.linear_probe else {}
    fed = server.cfg.federation
    scored = server.clients.score(weights, sorted(
        evaluation_cohort(fed.clients, fed.evaluation.eval_clients, server.cfg.seed, round_index, server.held_out)
        + sorted(server.held_out)))
    # Held-out clients never trained: they are reported apart, as unseen people.
    unseen = unseen_metrics(scored.rows, server.held_out)
    rows = [row for row in scored.rows if row["client"] not in server.held_out]
    metrics = {"global_acc": tested.accuracy, "global_loss": tested.loss,
               **global_class_metrics(tested.confusion, server.data.class_names),
               "global_confusion": tested.confusion.tolist(), "client_acc_mean": mean_acc(rows),
               "client_acc_pooled": pooled_acc(rows)}
    kinds = sorted({row["kind"] for row in rows})
    if len(kinds) > 1:
        metrics |= {f"client_acc_mean/{kind}": mean_acc([r for r in rows if r["kind"] == kind]) for kind in kinds}
    traffic = {"bytes_down": scored.bytes_down, "bytes_up": 0, "dropped_clients": scored.dropped}
    metrics |= personal_metrics(rows) | unseen | probe | traffic
    if server.held_out:  # every client's row, each saying whether it was held out
        rows = [row | {"held_out": row["client"] in server.held_out} for row in scored.rows]
    return metrics, rows


def linear_probe(server: Server) -> float:
    """The linear probe on the live model's features (`fedssl.evaluation.unseen`):
    fitted on the training clients' labeled split, scored on the server test set."""
    labeled = [c.labeled for c in server.data.clients if c.client_id not in server.held_out]
    pool, test = server.pool, server.test
    index = torch.from_numpy(np.concatenate(labeled) if labeled else np.empty(0, np.int64)).to(pool.labels.device)
    return linear_acc(server.model, pool.images[index], pool.labels[index], test.images, test.labels,
                      server.data.num_classes)
