"""FedMatch: disjoint gradients, helper choice, sparse deltas, aggregation, end to end."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from fedssl.config.load import load_recipe
from fedssl.algorithms.fedmatch import FedMatchConfig
from fedssl.config.schema import TrainConfig
from fedssl.errors import UserError
from fedssl.algorithms.aggregate import ServerState
from fedssl.algorithms.base import build_algorithm
from fedssl.algorithms.fedmatch import nearest_helpers
from fedssl.engine.federation import Federation
from fedssl.engine.run import run_federation
from fedssl.messages import Payload, Update, array_bytes
from fedssl.learners.base import ClientContext
from fedssl.learners.fedmatch import FedMatchLearner, agreement_labels, decode_delta, encode_delta, encode_update


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 3))


def batch(n: int = 4) -> dict:
    torch.manual_seed(1)
    return {"x": torch.randn(n, 1, 8, 8), "y": torch.tensor([0, 1, 2, 0])[:n],
            "u_weak": torch.randn(n, 1, 8, 8), "u_strong": torch.randn(n, 1, 8, 8), "u_index": torch.arange(n)}


def test_sigma_learns_only_from_labels_and_psi_only_from_unlabeled_data():
    learner = FedMatchLearner(tiny_model(), TrainConfig(), FedMatchConfig(tau=0.0))
    with torch.no_grad():  # psi away from 0 so that the L1 term has a gradient too
        for p in learner.psi:
            p.normal_(0, 0.1)
    helper = {n: v + 0.1 for n, v in tiny_model().state_dict().items()}
    learner.start_round(Payload(1, arrays={}, extras={f"helper0/{n}": v for n, v in helper.items()}), ClientContext(0, 4, 4))
    assert len(learner.helpers) == 1

    learner.labeled_loss(batch()).backward()
    assert all(p.grad is None for p in learner.psi)
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in learner.sigma)

    learner.zero_grad(set_to_none=True)
    loss, labels, mask = learner.unlabeled_loss(batch())
    loss.backward()
    assert all(s.grad is None for s in learner.sigma)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in learner.psi)
    assert mask.all() and labels.shape == (4,)


def test_helpers_follow_the_learner_to_another_dtype_and_layout():
    learner = FedMatchLearner(tiny_model(), TrainConfig(), FedMatchConfig())
    helper = {n: v + 0.1 for n, v in tiny_model().state_dict().items()}
    learner.start_round(Payload(1, arrays={}, extras={f"helper0/{n}": v for n, v in helper.items()}), ClientContext(0, 4, 4))
    images = batch()["u_weak"]
    [before] = learner.helper_log_probs(images)

    learner.to(torch.float64, memory_format=torch.channels_last)  # as train.memory_format converts a client's steps
    assert all(value.dtype == torch.float64 for value in learner.helpers[0].values())
    [after] = learner.helper_log_probs(images.double())
    torch.testing.assert_close(after.float(), before, rtol=1e-5, atol=1e-5)


def test_agreement_labels_take_the_majority_and_break_ties_by_the_local_model():
    local = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])
    helpers = [torch.tensor([[0.1, 0.8, 0.1], [0.1, 0.1, 0.8]]), torch.tensor([[0.1, 0.8, 0.1], [0.8, 0.1, 0.1]])]
    assert agreement_labels(local, helpers).tolist() == [1, 2]  # two helpers outvote; a 1-1-1 tie goes to local
    assert agreement_labels(local, []).tolist() == [0, 2]


def test_nearest_helpers_on_known_embeddings():
    points = np.array([[0.0], [1.0], [10.0], [11.5], [30.0]])
    assert nearest_helpers(points, 2) == [[1, 2], [0, 2], [3, 1], [2, 1], [3, 2]]
    assert nearest_helpers(points[:2], 5) == [[1], [0]]
    assert nearest_helpers(points[:1], 2) == [[]]


def test_sparse_deltas_drop_small_entries_and_count_their_bytes():
    received = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    new = received + torch.tensor([0.0, 1e-7, -0.25, 0.5, 2e-6])
    index, value = encode_delta(new, received, threshold=1e-5)
    assert index.dtype == torch.int32 and value.dtype == torch.float32
    assert index.tolist() == [2, 3] and torch.equal(value, (new - received)[[2, 3]])
    decoded = decode_delta(received, index, value)
    assert torch.equal(decoded[[0, 1, 4]], received[[0, 1, 4]]) and torch.allclose(decoded, torch.where(
        (new - received).abs() > 1e-5, new, received))

    learner = FedMatchLearner(tiny_model(), TrainConfig(), FedMatchConfig(sparsity=1e-3))
    names = learner.shared_names()
    learner.start_round(Payload(1, arrays=learner.arrays(names)), ClientContext(0, num_labeled=0, num_unlabeled=8))
    with torch.no_grad():
        learner.psi[0].view(-1)[[1, 4]] += torch.tensor([0.5, 1e-4])  # one entry over the threshold, one under
    update = Update(0, learner.arrays(names), num_examples=8)
    assert not any(k.startswith("sigma/") for k in update.arrays)  # no labels: sigma was not trained, not sent
    assert update.arrays["psi/0.weight/index"].tolist() == [1]
    assert all(update.arrays[f"psi/{n}/index"].numel() == 0 for n in learner.names[1:])
    sparse = {k: v for k, v in update.arrays.items() if k.endswith(("/index", "/value"))}
    buffers = {n: update.arrays[n] for n in learner.plain_names}
    assert set(update.arrays) == set(sparse) | set(buffers)
    assert update.num_bytes == 8 + array_bytes(buffers)  # one int32 index and one float32 value


def test_an_array_is_sent_sparse_only_where_that_is_smaller_than_dense():
    received = torch.zeros(10)
    few = encode_update(received + torch.tensor([1.0] * 4 + [0.0] * 6), received, 0.0, "psi/w")  # 4 x 8 < 10 x 4 bytes
    assert set(few) == {"psi/w/index", "psi/w/value"} and array_bytes(few) == 32
    new = received + torch.tensor([1.0] * 5 + [0.0] * 5)  # 5 x 8 bytes is not below 40: dense
    many = encode_update(new, received, 0.0, "psi/w")
    assert set(many) == {"psi/w"} and torch.equal(many["psi/w"], new) and array_bytes(many) == 40


def fedmatch_setup(tiny_recipe, *overrides):
    cfg = load_recipe(tiny_recipe, ["algorithm.name=fedmatch", *overrides])
    algorithm = build_algorithm(cfg)
    learner = algorithm.make_learner(tiny_model())
    return algorithm, algorithm.init_server_state(learner.arrays(algorithm.shared_names(learner)))


def sparse(part: str, name: str, index: list[int], value: list[float]) -> dict:
    return {f"{part}/{name}/index": torch.tensor(index, dtype=torch.int32), f"{part}/{name}/value": torch.tensor(value)}


def test_aggregation_of_two_sparse_updates_by_hand(tiny_recipe):
    algorithm, state = fedmatch_setup(tiny_recipe)
    params = dict(state.params) | {"sigma/5.bias": torch.tensor([1.0, 2.0, 3.0]), "psi/5.bias": torch.zeros(3),
                                   "1.running_mean": torch.zeros(2), "1.num_batches_tracked": torch.tensor(0)}
    buffers = lambda mean, count: {"1.running_mean": torch.full((2,), mean), "1.running_var": torch.ones(2),
                                   "1.num_batches_tracked": torch.tensor(count)}
    a = Update(0, sparse("sigma", "5.bias", [0, 2], [1.0, -2.0]) | buffers(1.0, 4), num_examples=1)  # no psi sent
    b = Update(1, sparse("sigma", "5.bias", [2], [4.0]) | sparse("psi", "5.bias", [1], [0.5]) | buffers(3.0, 8), num_examples=3)
    aggregated = algorithm.aggregate([a, b], ServerState(params=params))
    new = aggregated.params
    assert torch.allclose(new["sigma/5.bias"], torch.tensor([1.25, 2.0, 5.5]))  # 3 + (0.25 * -2 + 0.75 * 4)
    assert torch.allclose(new["psi/5.bias"], torch.tensor([0.0, 0.5, 0.0]))  # only b trained psi
    assert torch.equal(new["sigma/0.weight"], params["sigma/0.weight"])  # nobody changed it
    assert torch.allclose(new["1.running_mean"], torch.full((2,), 2.5)) and int(new["1.num_batches_tracked"]) == 7
    assert torch.allclose(algorithm.global_weights(ServerState(params=new))["5.bias"], torch.tensor([1.25, 2.5, 5.5]))
    assert torch.allclose(aggregated.extras["model/1/5.bias"], torch.tensor([1.0, 2.5, 7.0]))  # b's own sigma + psi
    assert set(aggregated.extras) == {f"{kind}/{c}{rest}" for c in (0, 1) for kind, rest in
                                      [("embedding", "")] + [("model", f"/{n}") for n in tiny_model().state_dict()]}


def test_helpers_are_the_nearest_client_models_and_cached_between_refreshes(tiny_recipe):
    algorithm, state = fedmatch_setup(tiny_recipe, "algorithm.fedmatch.helpers=1", "algorithm.fedmatch.helper_every=2")
    assert algorithm.payload(1, algorithm.server_round(1, state, None), 0).extras == {}  # nobody reported yet
    # Clients 0 and 1 send the same small change, client 2 a large one: 0 and 1 are each other's nearest.
    updates = [Update(0, sparse("sigma", "5.bias", [1], [0.1]), 5), Update(1, sparse("sigma", "5.bias", [1], [0.1]), 5),
               Update(2, sparse("sigma", "5.bias", [0], [5.0]), 5)]
    state = algorithm.server_round(2, algorithm.aggregate(updates, state), None)
    payload = algorithm.payload(2, state, client_id=0)
    assert int(state.extras["helpers/0"]) == 1 and int(state.extras["helpers/1"]) == 0
    assert set(payload.extras) == {f"helper0/{n}" for n in tiny_model().state_dict()}
    assert torch.allclose(payload.extras["helper0/5.bias"], state.extras["model/1/5.bias"])
    assert payload.arrays is state.params  # the server's own state stays with it

    cached = payload.extras["helper0/5.bias"]
    moved = [Update(1, sparse("sigma", "5.bias", [2], [1.0]), 5)]
    state = algorithm.server_round(3, algorithm.aggregate(moved, state), None)  # one round after the refresh: cached
    assert torch.equal(algorithm.payload(3, state, 0).extras["helper0/5.bias"], cached)
    state = algorithm.server_round(4, state, None)  # two rounds after: refreshed with client 1's new model
    assert not torch.equal(algorithm.payload(4, state, 0).extras["helper0/5.bias"], cached)


SCENARIOS = {
    "labels-at-client": ["data.labels.mode=client", "data.labels.per_class=2"],
    "labels-at-server": ["data.labels.mode=server", "data.labels.server_per_class=5", "algorithm.ssl.server_steps=5"],
}
# The authors' learning rate: with lambda_s = lambda_l2 = 10 the tiny recipe's 0.05 with
# momentum diverges. The L2 tie moves every psi entry each step (by 2 lr lambda_l2 (sigma
# - psi)), so deltas are sparse only above a threshold of that size: 1e-3 here. Three
# rounds leave the model near uniform, so tau = 0 makes the consistency terms count.
COMMON = ["algorithm.name=fedmatch", "algorithm.ssl.unlabeled_ratio=2", "federation.rounds=3",
          "algorithm.fedmatch.helper_every=1", "algorithm.fedmatch.tau=0", "algorithm.fedmatch.sparsity=1e-3",
          "train.lr=0.001", "train.momentum=0"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_fedmatch_runs_end_to_end_with_sparse_uploads(tiny_recipe, tmp_path, scenario):
    cfg = load_recipe(tiny_recipe, SCENARIOS[scenario] + COMMON)
    summary = run_federation(cfg, tmp_path / scenario)
    assert all(math.isfinite(summary[k]) for k in ("global_acc", "global_loss", "client_acc_mean", "pl_mask_rate"))
    num_weights = sum(p.numel() for p in Federation.build(cfg).model.parameters())
    dense_fedavg = cfg.federation.rounds * cfg.federation.clients_per_round * 4 * num_weights
    assert 0 < summary["bytes_up"] < dense_fedavg
    rounds = [json.loads(line) for line in (tmp_path / scenario / "metrics.jsonl").read_text().splitlines()]
    assert rounds[1]["bytes_down"] > rounds[0]["bytes_down"]  # helpers travel once clients have reported


def test_labels_at_server_trains_sigma_on_the_server_and_psi_on_the_clients(tiny_recipe):
    federation = Federation.build(load_recipe(tiny_recipe, SCENARIOS["labels-at-server"] + COMMON))
    algorithm, before = federation.algorithm, federation.initial_state()
    state = algorithm.server_round(1, before, federation.train_on_server)
    assert not torch.equal(state.params["sigma/fc.weight"], before.params["sigma/fc.weight"])
    assert torch.equal(state.params["psi/fc.weight"], before.params["psi/fc.weight"])
    client = federation.data.clients[0]
    update, _ = federation.trainer.fit(client.client_id, client.labeled, client.unlabeled, algorithm.payload(1, state, 0))
    assert any(k.startswith("psi/") for k in update.arrays) and not any(k.startswith("sigma/") for k in update.arrays)


def test_labels_at_server_without_server_training_is_refused(tiny_recipe):
    with pytest.raises(UserError, match="algorithm.ssl.server_steps"):
        build_algorithm(load_recipe(tiny_recipe, ["algorithm.name=fedmatch", "data.labels.mode=server",
                                                  "data.labels.server_per_class=5"]))
