"""Personalized evaluation: each client's own model on its own local test split."""

import math

import numpy as np
import pytest
import torch

from fedssl.config.load import load_recipe
from fedssl.engine.federation import Federation
from fedssl.evaluation.metrics import mean_acc, pooled_acc
from fedssl.evaluation.personal import labeled_batches, personal_metrics, personal_summary, worst_share_mean


def rows(accs, samples=None, f1s=None):
    samples = samples or [10] * len(accs)
    f1s = f1s or [a / 2 for a in accs]
    return [{"client": i, "personal_acc": a, "personal_f1": f, "test_samples": n}
            for i, (a, f, n) in enumerate(zip(accs, f1s, samples))]


def test_personal_acc_is_the_mean_and_p10_the_mean_of_the_worst_tenth():
    accs = [0.9, 0.1, 0.8, 0.7, 0.6, 0.5, 0.95, 0.85, 0.75, 0.65, 0.55, 0.45, 0.35, 0.3, 0.2, 0.92, 0.88, 0.77, 0.66, 0.4]
    metrics = personal_metrics(rows(accs))
    assert metrics["personal_acc"] == pytest.approx(sum(accs) / 20)
    assert metrics["personal_acc_p10"] == pytest.approx((0.1 + 0.2) / 2)  # the worst 2 of 20


def test_pooled_accuracy_weighs_each_test_sample_alike_and_the_mean_each_client():
    # 9 of 10 right on a small split, 45 of 90 on a large one: mean over clients
    # (0.9 + 0.5) / 2 = 0.7, pooled (9 + 45) / (10 + 90) = 0.54 (PFLlib's figure)
    metrics = personal_metrics(rows([0.9, 0.5, float("nan")], samples=[10, 90, 0]))
    assert metrics["personal_acc"] == pytest.approx(0.7)
    assert metrics["personal_acc_pooled"] == pytest.approx(0.54)
    global_rows = [{"acc": 0.9, "test_samples": 10}, {"acc": 0.5, "test_samples": 90}, {"acc": 0.0, "test_samples": 0}]
    assert mean_acc(global_rows) == pytest.approx(0.7) and pooled_acc(global_rows) == pytest.approx(0.54)
    assert pooled_acc([{"acc": 2 / 3, "test_samples": 3}, {"acc": 1 / 7, "test_samples": 7}]) == 0.3  # exact counts
    assert math.isnan(pooled_acc([{"acc": float("nan"), "test_samples": 0}]))


def test_clients_without_a_local_test_split_do_not_count():
    metrics = personal_metrics(rows([0.5, float("nan"), 1.0], samples=[4, 0, 4], f1s=[0.2, float("nan"), 0.6]))
    assert metrics["personal_acc"] == pytest.approx(0.75)
    assert metrics["personal_f1_macro"] == pytest.approx(0.4)
    assert metrics["personal_acc_p10"] == pytest.approx(0.5)  # ceil(10% of 2) = 1 client


def test_the_worst_share_is_at_least_one_client():
    assert worst_share_mean([0.3, 0.9, 0.6]) == pytest.approx(0.3)
    assert math.isnan(worst_share_mean([]))


def test_the_summary_reports_the_final_round_and_labels_the_best_one():
    history = [{"round": 1, "personal_acc": 0.4}, {"round": 2, "train_loss": 1.0},
               {"round": 3, "personal_acc": 0.7}, {"round": 4, "personal_acc": None}, {"round": 5, "personal_acc": 0.6}]
    summary = personal_summary({"personal_acc": 0.6, "personal_acc_p10": 0.2}, history)
    assert summary == {"personal_acc": 0.6, "personal_acc_p10": 0.2, "personal_acc_best": 0.7,
                       "personal_acc_best_round": 3}


def test_adaptation_batches_come_from_the_given_training_indices_only():
    images = torch.arange(20, dtype=torch.float32).reshape(20, 1)
    labels = torch.arange(20)
    train = np.array([3, 5, 8])
    seen = [x for x, _ in labeled_batches(images, labels, train, 2, seed=0, client_id=1, steps=4, drop_last=False)]
    assert len(seen) == 4 and set(torch.cat(seen).flatten().long().tolist()) <= {3, 5, 8}
    assert [len(x) for x in seen] == [2, 1, 2, 1]
    again = [x for x, _ in labeled_batches(images, labels, train, 2, seed=0, client_id=1, steps=4, drop_last=False)]
    assert all(torch.equal(a, b) for a, b in zip(seen, again)), "the same batches at every evaluation"
    assert list(labeled_batches(images, labels, train[:0], 2, seed=0, client_id=1, steps=4, drop_last=False)) == []
    # train.drop_last: adaptation never steps on the one image a pass leaves over
    dropped = [x for x, _ in labeled_batches(images, labels, train, 2, seed=0, client_id=1, steps=4, drop_last=True)]
    assert [len(x) for x in dropped] == [2, 2, 2, 2]


def test_each_client_is_scored_with_its_own_head_on_its_own_test_split(tiny_recipe):
    """Give client 0 a head that always answers class c: its personal accuracy is then
    the share of c in its own local test split, and no other client's score moves."""
    federation = Federation.build(load_recipe(tiny_recipe, ["algorithm.name=fedper"]))
    state = federation.initial_state()
    _, before = federation.evaluate(state)
    target = int(federation.pool.labels[torch.from_numpy(federation.data.clients[0].test)].mode().values)
    weight = torch.zeros_like(federation.model.fc.weight)
    bias = torch.full_like(federation.model.fc.bias, -10.0)
    bias[target] = 10.0
    federation.clients.store.put(0, {"personal/fc.weight": weight, "personal/fc.bias": bias})
    metrics, after = federation.evaluate(state)
    own_labels = federation.pool.labels[torch.from_numpy(federation.data.clients[0].test)]
    assert after[0]["personal_acc"] == pytest.approx(float((own_labels == target).float().mean()))
    assert after[0]["acc"] == before[0]["acc"], "the global model's score is not the personal one"
    for old, new in zip(before[1:], after[1:]):
        assert new["personal_acc"] == old["personal_acc"]
    assert metrics["personal_acc"] == pytest.approx(np.mean([r["personal_acc"] for r in after if r["test_samples"]]))
    correct = sum(round(r["personal_acc"] * r["test_samples"]) for r in after)
    assert metrics["personal_acc_pooled"] == pytest.approx(correct / sum(r["test_samples"] for r in after))
    assert metrics["client_acc_pooled"] == pytest.approx(sum(round(r["acc"] * r["test_samples"]) for r in after)
                                                         / sum(r["test_samples"] for r in after))


def test_without_personalization_the_personal_score_is_the_global_models(tiny_recipe):
    federation = Federation.build(load_recipe(tiny_recipe))
    metrics, client_rows = federation.evaluate(federation.initial_state())
    assert all(r["personal_acc"] == r["acc"] for r in client_rows)
    assert metrics["personal_acc"] == pytest.approx(metrics["client_acc_mean"])


def test_meta_learners_are_scored_after_adapting_on_their_training_data(tiny_recipe):
    cfg = load_recipe(tiny_recipe, ["algorithm.name=reptile", "algorithm.meta.adapt_steps=3"])
    federation = Federation.build(cfg)
    state = federation.initial_state()
    client = federation.clients.scorer.local_client(0)
    adapted = federation.algorithm.personal_weights(state.params, client)
    assert not torch.equal(adapted["fc.weight"], state.params["fc.weight"])
    assert torch.equal(federation.algorithm.personal_weights(state.params, client)["fc.weight"], adapted["fc.weight"])
