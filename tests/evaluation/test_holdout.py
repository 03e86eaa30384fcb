"""Unseen people (`federation.evaluation.holdout_clients`): held-out clients never train, and at
evaluation adapt with their labeled images and are scored on the rest (`unseen_acc`)."""

import numpy as np
import pytest
import torch

from fedssl.config.load import load_recipe
from fedssl.errors import UserError
from fedssl.engine.federation import Federation
from fedssl.sampling import held_out_clients

FEW_LABELS = ["data.labels.mode=client", "data.labels.per_class=2", "algorithm.ssl.unlabeled_ratio=1",
              "train.local_steps=2"]


def test_held_out_clients_are_a_share_or_a_count_drawn_from_the_seed(tiny_recipe):
    share = load_recipe(tiny_recipe, ["federation.evaluation.holdout_clients=0.34"]).federation
    count = load_recipe(tiny_recipe, ["federation.evaluation.holdout_clients=2"]).federation
    assert len(held_out_clients(share, 0)) == len(held_out_clients(count, 0)) == 2
    assert held_out_clients(count, 0) == held_out_clients(count, 0) <= set(range(6))
    assert {frozenset(held_out_clients(count, seed)) for seed in range(5)} != {held_out_clients(count, 0)}
    assert held_out_clients(load_recipe(tiny_recipe).federation, 0) == frozenset()


@pytest.mark.parametrize("value, message", [("4", "leaves fewer than the 3 a round samples"),
                                            ("1.5", "a share in"), ("-1", "a share in")])
def test_a_holdout_that_leaves_too_few_clients_is_refused(tiny_recipe, value, message):
    with pytest.raises(UserError, match=f"federation.evaluation.holdout_clients: .*{message}"):
        load_recipe(tiny_recipe, [f"federation.evaluation.holdout_clients={value}"])


@pytest.mark.parametrize("algorithm", ["fedavg", "fedaffect", "fedper"])
def test_held_out_clients_never_train_and_none_of_their_images_reach_training(tiny_recipe, algorithm):
    cfg = load_recipe(tiny_recipe, [f"algorithm.name={algorithm}", *FEW_LABELS, "federation.evaluation.holdout_clients=2",
                                    "federation.rounds=4"])
    federation = Federation.build(cfg)
    held = federation.held_out
    assert len(held) == 2
    trained, inner = [], federation.trainer.fit

    def recording_fit(client_id, labeled, unlabeled, payload, *args, **kwargs):
        trained.append((client_id, labeled, unlabeled))
        return inner(client_id, labeled, unlabeled, payload, *args, **kwargs)

    federation.trainer.fit = recording_fit
    state = federation.initial_state()
    for round_index in range(1, 5):
        state, _ = federation.fit_round(round_index, state)
    metrics, rows = federation.evaluate(state)
    assert len(trained) == 4 * 3 and not {c for c, _, _ in trained} & held
    held_images = np.concatenate([np.concatenate([c.labeled, c.unlabeled, c.test])
                                  for c in federation.data.clients if c.client_id in held])
    seen = np.concatenate([np.concatenate([labeled, unlabeled]) for _, labeled, unlabeled in trained])
    assert len(held_images) and not np.intersect1d(held_images, seen).size
    # reported apart: unseen_acc for them, the other metrics over the training clients only
    assert {row["client"] for row in rows if row["held_out"]} == held
    assert 0.0 <= metrics["unseen_acc"] <= 1.0 and 0.0 <= metrics["unseen_global_acc"] <= 1.0
    trained_rows = [row for row in rows if not row["held_out"]]
    assert metrics["client_acc_mean"] == pytest.approx(np.mean([r["acc"] for r in trained_rows]))


def test_unseen_acc_of_a_model_that_ignores_its_input_is_the_held_out_majority_class_rate(tiny_recipe):
    cfg = load_recipe(tiny_recipe, [*FEW_LABELS, "federation.evaluation.holdout_clients=2", "federation.evaluation.holdout_steps=0"])
    federation = Federation.build(cfg)
    labels = federation.data.pool.labels
    # each held-out client is scored on everything but the labeled images it adapts with
    scored = {c.client_id: labels[np.concatenate([c.unlabeled, c.test])]
              for c in federation.data.clients if c.client_id in federation.held_out}
    majority = int(np.bincount(np.concatenate(list(scored.values())), minlength=7).argmax())
    state = federation.initial_state()
    constant = {n: torch.zeros_like(v) for n, v in state.params.items()}
    constant["fc.bias"] = torch.nn.functional.one_hot(torch.tensor(majority), 7).float()
    metrics, rows = federation.evaluate(type(state)(params=constant))
    expected = np.mean([np.mean(client_labels == majority) for client_labels in scored.values()])
    assert metrics["unseen_acc"] == pytest.approx(expected) and metrics["unseen_global_acc"] == pytest.approx(expected)
    assert {r["client"]: r["test_samples"] for r in rows if r["held_out"]} == {c: len(v) for c, v in scored.items()}


def test_a_held_out_client_adapts_its_head_on_its_labeled_images(tiny_recipe):
    cfg = load_recipe(tiny_recipe, [*FEW_LABELS, "federation.evaluation.holdout_clients=2", "federation.evaluation.holdout_steps=5"])
    federation = Federation.build(cfg)
    metrics, rows = federation.evaluate(federation.initial_state())
    held = [r for r in rows if r["held_out"]]
    assert any(r["personal_acc"] != r["acc"] for r in held)  # adapting changed the predictions
