"""Each client's evaluation row, scored in this process on the client's own data.

A row holds the global model and the client's personalized model on the client's
local test split. That is all a node needs to score its clients: the global
weights and what its clients keep, never the server's state, so the in-process run
and a Flower node (`fedssl.backends.flower.client`) score alike. A held-out client
never trained, so its "personalized" model is the one it adapts from the global
weights with its labeled images (`Algorithm.unseen_weights`), scored on the rest of
its data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Collection

import torch

from fedssl.algorithms.base import Algorithm, LocalClient
from fedssl.config.schema import RecipeConfig
from fedssl.data.federated import FederatedData
from fedssl.evaluation.metrics import client_kind
from fedssl.evaluation.personal import labeled_batches
from fedssl.evaluation.score import Score, score
from fedssl.evaluation.unseen import fine_tune_head, scored_indices
from fedssl.inprocess.state import ClientStateStore
from fedssl.inprocess.trainer import ClientTrainer
from fedssl.messages import Arrays


@dataclass
class Scorer:
    """Scores clients of `data` on the trainer's learner (loading weights into it:
    scoring, like training, reuses the one learner of the run)."""

    cfg: RecipeConfig
    data: FederatedData
    algorithm: Algorithm
    trainer: ClientTrainer
    store: ClientStateStore  # what each client keeps, which its personalized model may use
    held_out: Collection[int]  # clients that never train, scored as unseen people

    def rows(self, weights: Arrays, client_ids: list[int]) -> list[dict[str, Any]]:
        """Per client, the global model (`weights`, the algorithm's `global_weights`)
        and the client's personalized model on the client's own local test split."""
        self.trainer.learner.load_arrays(weights)
        rows, scores = [], []
        for client_id in client_ids:
            scores.append(self.local(client_id))
            rows.append({"client": client_id, "kind": client_kind(self.data.clients[client_id]),
                         "test_samples": scores[-1].count, "acc": scores[-1].accuracy, "loss": scores[-1].loss})
        self.personal(weights, rows, scores)
        return rows

    def local(self, client_id: int) -> Score:
        """The live model on the client's own local test split (a held-out client's:
        all but its labeled samples)."""
        client, pool = self.data.clients[client_id], self.trainer.pool
        scored = scored_indices(client.labeled, client.unlabeled, client.test, client_id in self.held_out)
        index = torch.from_numpy(scored).to(pool.labels.device)
        return score(self.trainer.learner.model, pool.images[index], pool.labels[index])

    def local_client(self, client_id: int, kept: bool = True) -> LocalClient:
        """What the client's personalization may use: its kept state (none, `kept`
        False) and its labeled training data."""
        labeled, pool, train = self.data.clients[client_id].labeled, self.trainer.pool, self.cfg.train
        batches = lambda steps: labeled_batches(pool.images, pool.labels, labeled, train.batch_size,
                                                self.cfg.seed, client_id, steps, drop_last=train.drop_last)
        return LocalClient(client_id, self.store.peek(client_id) if kept else {}, batches)

    def personal(self, weights: Arrays, rows: list[dict[str, Any]], scores: list[Score]) -> None:
        """Add each client's personalized model's scores on its own local test split to
        its row: accuracy, loss and macro-F1. Without personalization that model is the
        global one, whose `scores` are those of the rows, so it is not scored again."""
        for row, local in zip(rows, scores):
            weights_of_client = self.personal_weights(weights, row["client"])
            if weights_of_client is not None:
                self.trainer.learner.load_arrays(weights_of_client)
                local = self.local(row["client"])
            row |= {"personal_acc": local.accuracy, "personal_loss": local.loss, "personal_f1": local.f1_macro}

    def personal_weights(self, weights: Arrays, client_id: int) -> Arrays | None:
        """The client's personalized weights from the global `weights`, or None where
        they are the global ones: a held-out client adapts them with its labeled
        images, having kept nothing; a client of a personalizing algorithm with what
        it kept and its training data."""
        if client_id in self.held_out:
            client = self.local_client(client_id, kept=False)  # it never trained: it kept nothing
            steps, lr = self.cfg.federation.evaluation.holdout_steps, self.cfg.train.lr
            tune = lambda arrays: fine_tune_head(self.trainer.learner.model, arrays, client.batches(steps), lr)
            return self.algorithm.unseen_weights(weights, client, tune)
        if self.algorithm.capabilities.personalized:
            return self.algorithm.personal_weights(weights, self.local_client(client_id))
        return None
