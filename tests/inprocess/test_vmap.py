"""Clients trained together (torch.func.vmap) end where sequential training ends:
the loop's Lightning Fabric path at train.precision 32 (fedssl.inprocess.trainer)."""

import logging

import pytest
import torch

from fedssl.config.load import load_recipe
from fedssl.engine.checkpoint import load_checkpoint
from fedssl.engine.federation import Federation
from fedssl.engine.run import run_federation
from fedssl.inprocess.executors import Sequential, Vmap
from fedssl.run_dir import CHECKPOINT

# The cohort trains contiguous weights; the sequential path it is compared with does
# too (on a CPU it would otherwise train channels-last: the same model, other rounding).
VMAP = ["federation.execution.concurrency=vmap", "train.memory_format=contiguous"]


def build(recipe, *overrides: str) -> Federation:
    return Federation.build(load_recipe(recipe, list(overrides)))


def train_both_ways(federation: Federation, clients=(0, 1, 2, 3)):
    """(vectorized updates, sequential updates) of `clients` from the same round-1 payloads."""
    state = federation.initial_state()
    payloads = {c: federation.algorithm.payload(1, state, c) for c in clients}
    cohort = federation.clients.executor.cohort
    together = cohort.fit([(c, federation.data.clients[c].labeled, payloads[c]) for c in clients])
    one_by_one = [federation.trainer.fit(c, federation.data.clients[c].labeled, federation.data.clients[c].unlabeled,
                                         payloads[c])[0] for c in clients]
    return together, one_by_one


@pytest.mark.parametrize("overrides", [
    ["train.momentum=0"],
    ["train.momentum=0.9", "train.weight_decay=0.001"],
    ["algorithm.name=fedprox", "algorithm.proximal_mu=0.5"],
    ["data.augment=weak"],
    ["data.augment=weak", "data.augment_backend=torch"],
    # More steps than one pass: the stream reshuffles mid-round. (At the tiny recipe's
    # lr 0.05 with momentum 0.9, float rounding differences grow past 1e-5 after ~7 steps.)
    ["train.local_steps=9", "train.lr=0.01"],
    # Short last batches, padded in the cohort: kept (drop_last false), or a client's
    # only batch when it holds fewer images than one (batch 100).
    ["train.drop_last=false"],
    ["train.batch_size=100", "train.local_epochs=2"],
], ids=["sgd", "momentum+weight_decay", "fedprox", "augmented", "augmented-torch", "local_steps", "short_batches", "one_short_batch"])
def test_vectorized_training_equals_sequential_training(tiny_recipe, overrides):
    federation = build(tiny_recipe, *VMAP, *overrides)
    assert isinstance(federation.clients.executor, Vmap)
    assert federation.trainer.fabric.strategy.precision.precision == "32-true"  # the path compared against
    sizes = [len(federation.data.clients[c].labeled) for c in range(4)]
    assert len(set(sizes)) > 1 and any(n % 16 for n in sizes)  # unequal clients, short remainders
    together, one_by_one = train_both_ways(federation)
    for vectorized, sequential in zip(together, one_by_one):
        assert vectorized.client_id == sequential.client_id
        assert vectorized.num_examples == sequential.num_examples
        assert vectorized.metrics.keys() == sequential.metrics.keys()
        assert vectorized.metrics["train_loss"] == pytest.approx(sequential.metrics["train_loss"], rel=1e-5)
        torch.testing.assert_close(vectorized.arrays, sequential.arrays, rtol=1e-5, atol=1e-6)


def test_clients_with_different_step_counts_stop_at_their_own(tiny_recipe):
    # batch 32: the clients' 61 to 67 samples take 1 or 2 full batches (train.drop_last);
    # one with 2 must not move a 1-step one further
    federation = build(tiny_recipe, *VMAP, "train.batch_size=32")
    steps = {len(federation.data.clients[c].labeled) // 32 for c in range(6)}
    assert len(steps) > 1, steps
    together, one_by_one = train_both_ways(federation, clients=tuple(range(6)))
    for vectorized, sequential in zip(together, one_by_one):
        torch.testing.assert_close(vectorized.arrays, sequential.arrays, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_a_two_round_run_ends_with_the_same_weights_either_way(tiny_recipe, tmp_path):
    overrides = ["federation.rounds=2", "federation.clients_per_round=4"]
    sequential = run_federation(load_recipe(tiny_recipe, [*overrides, "federation.execution.concurrency=sequential"]), tmp_path / "seq")
    # concurrent_clients=3: the 4 sampled clients train in two chunks
    together = run_federation(load_recipe(tiny_recipe, [*overrides, *VMAP, "federation.execution.concurrent_clients=3"]),
                              tmp_path / "vmap")
    assert together["global_acc"] == pytest.approx(sequential["global_acc"], abs=1e-6)
    assert together["global_loss"] == pytest.approx(sequential["global_loss"], rel=1e-5)
    torch.testing.assert_close(load_checkpoint(tmp_path / "vmap" / CHECKPOINT)["server_state"]["params"],
                               load_checkpoint(tmp_path / "seq" / CHECKPOINT)["server_state"]["params"],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("overrides, reason", [
    (["algorithm.name=fixmatch", "data.labels.mode=client", "data.labels.per_class=2"], "FixMatchLearner"),
    (["algorithm.name=fedper"], "PersonalLayersLearner"),
    (["train.optimizer=adam"], "train.optimizer=adam"),
    (["model.name=fedavg_cnn_bn"], "buffers"),
    (["model.kwargs={drop_rate: 0.5}"], "cannot be vectorized"),  # dropout draws randomly
    (["train.precision=bf16-mixed"], "train.precision=bf16-mixed; only 32 is vectorized"),
])
def test_what_cannot_be_vectorized_trains_one_at_a_time_and_says_why(tiny_recipe, caplog, overrides, reason):
    with caplog.at_level(logging.WARNING, logger="fedssl.inprocess.vmap"):
        federation = build(tiny_recipe, *VMAP, *overrides)
    assert isinstance(federation.clients.executor, Sequential)
    lines = [r.getMessage() for r in caplog.records if "one at a time" in r.getMessage()]
    assert len(lines) == 1 and reason in lines[0], lines


def test_auto_trains_one_at_a_time_on_the_cpu(tiny_recipe):
    assert isinstance(build(tiny_recipe, "federation.execution.concurrency=auto").clients.executor, Sequential)


def test_a_failing_cohort_is_retrained_one_client_at_a_time(tiny_recipe, monkeypatch, caplog):
    federation = build(tiny_recipe, *VMAP, "federation.clients_per_round=4")
    expected = build(tiny_recipe, "federation.execution.concurrency=sequential", "federation.clients_per_round=4")

    def fail(clients):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(federation.clients.executor.cohort, "fit", fail)
    state, metrics = federation.fit_round(1, federation.initial_state())
    reference, reference_metrics = expected.fit_round(1, expected.initial_state())
    assert "training 4 clients together raised RuntimeError: CUDA out of memory; training them one at a time" in caplog.text
    assert metrics["clients"] == 4 and metrics["dropped_clients"] == 0
    torch.testing.assert_close(state.params, reference.params)


def test_a_non_finite_vectorized_update_is_dropped(tiny_recipe, monkeypatch, caplog):
    federation = build(tiny_recipe, *VMAP, "federation.clients_per_round=4")
    fit = federation.clients.executor.cohort.fit

    def poison(clients):
        updates = fit(clients)
        next(iter(updates[0].arrays.values())).fill_(float("nan"))
        return updates

    monkeypatch.setattr(federation.clients.executor.cohort, "fit", poison)
    _, metrics = federation.fit_round(1, federation.initial_state())
    assert metrics["dropped_clients"] == 1 and metrics["clients"] == 3
    assert "non-finite values" in caplog.text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_vectorized_training_equals_sequential_training_on_the_gpu(tiny_recipe, monkeypatch):
    # TF32 would round the two paths' (differently shaped) convolutions differently
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    federation = build(tiny_recipe, "federation.execution.device=cuda", "train.momentum=0.9", "train.weight_decay=0.001")
    assert isinstance(federation.clients.executor, Vmap)  # federation.execution.concurrency: auto picks vmap on CUDA
    together, one_by_one = train_both_ways(federation)
    for vectorized, sequential in zip(together, one_by_one):
        assert vectorized.arrays["fc.weight"].is_cuda
        torch.testing.assert_close(vectorized.arrays, sequential.arrays, rtol=1e-4, atol=1e-5)


def test_clients_without_labels_train_the_sequential_way(tiny_recipe, caplog):
    # labels at the server: no client holds labeled data, so nothing is stacked
    overrides = ["data.labels.mode=server", "data.labels.server_per_class=3", "federation.clients_per_round=4"]
    federation = build(tiny_recipe, *VMAP, *overrides)
    expected = build(tiny_recipe, "federation.execution.concurrency=sequential", *overrides)
    _, metrics = federation.fit_round(1, federation.initial_state())
    _, reference = expected.fit_round(1, expected.initial_state())
    assert metrics["clients"] == reference["clients"] == 4 and "together" not in caplog.text
