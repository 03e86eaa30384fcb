"""Data locality: what every client sends is parameter arrays of the model and
scalar metrics, never images, labels or per-sample values. On the Flower backend
a node sends exactly these updates through the codec (which refuses anything but
arrays and scalars), and its evaluation replies hold per-client scores only.
"""

import dataclasses
import importlib

import pytest
import torch

from fedssl.backends.flower.codec import decode_update, encode_rows, encode_update

from fedssl.config.load import load_recipe
from fedssl.federation.algorithm import ALGORITHM_MODULES, ALGORITHMS
from fedssl.federation.loop import Federation
from fedssl.federation.messages import Update

MIXED_CLIENTS = ["data.labels.mode=client", "data.labels.per_class=2", "algorithm.ssl.unlabeled_ratio=2"]
# What each algorithm needs beyond the tiny recipe (as in test_ssl_learning's smoke cases);
# every client here holds labeled and unlabeled data, so every learner path runs.
SETTINGS = {
    "fedprox": ["algorithm.proximal_mu=0.01"],
    "fixmatch": MIXED_CLIENTS,
    "semifl": ["data.labels.mode=server", "data.labels.server_per_class=3", "algorithm.ssl.server_steps=3"],
    "fedmatch": MIXED_CLIENTS,
    "fedbn": ["model.name=fedavg_cnn_bn"],
}


def registered_algorithms() -> list[str]:
    for module in ALGORITHM_MODULES:
        importlib.import_module(module)
    return ALGORITHMS.names()


@pytest.mark.parametrize("algorithm", registered_algorithms())
def test_every_update_holds_only_the_models_arrays_and_scalar_metrics(tiny_recipe, monkeypatch, over_flower_wire,
                                                                      algorithm):
    cfg = load_recipe(tiny_recipe, [f"algorithm.name={algorithm}", *SETTINGS.get(algorithm, []),
                                    "federation.clients_per_round=6"])
    federation = Federation.build(cfg)
    learner = federation.trainer.learner
    shared = {n: a.shape for n, a in learner.arrays(federation.trainer.shared_names).items()}
    state_dict_names = set(learner.model.state_dict())
    sent: list[Update] = []
    fit = federation.trainer.fit

    def recording_fit(client_id, *args, **kwargs):  # the real client, its message kept for inspection
        update, kept = fit(client_id, *args, **kwargs)
        if client_id >= 0:  # not the server training on its own labels
            sent.append(update)
        return update, kept

    monkeypatch.setattr(federation.trainer, "fit", recording_fit)
    state = federation.initial_state()
    for round_index in (1, 2):
        state, metrics = federation.fit_round(round_index, state)
        assert metrics["dropped_clients"] == 0
    assert len(sent) == 12

    for update in sent:
        # nothing but the four fields of the message
        assert {f.name for f in dataclasses.fields(update)} == {"client_id", "arrays", "num_examples", "metrics"}
        assert isinstance(update.num_examples, int) and isinstance(update.client_id, int)
        for name, value in update.metrics.items():
            assert isinstance(value, (int, float)) and not isinstance(value, bool), (name, value)
        for name, array in update.arrays.items():
            assert isinstance(array, torch.Tensor)
            base = name.rsplit("/", 1)[0] if name.endswith(("/index", "/value")) else name
            assert base in shared, f"{algorithm}: {name!r} is not one of the model's shared arrays"
            # a shared array is a state_dict entry, or FedMatch's sigma/psi decomposition of one
            assert base in state_dict_names or base.split("/", 1)[1] in state_dict_names
            if base == name:
                assert array.shape == shared[name]
            else:  # a sparse delta: at most one entry per weight of that array
                assert array.dim() == 1 and len(array) <= torch.Size(shared[base]).numel()
        # no more numbers than the model holds (a sparse delta: an index and a value per entry)
        total = sum(a.numel() for a in update.arrays.values())
        assert total <= 2 * sum(torch.Size(s).numel() for s in shared.values())

        # on Flower, exactly this crosses the wire, and nothing beside it
        wire = over_flower_wire(encode_update(update))
        assert set(wire) == {"arrays", "metrics", "meta"}
        received = decode_update(wire)
        assert list(received.arrays) == list(update.arrays) and received.metrics == update.metrics

    # a Flower node's evaluation reply: per-client scores, no per-sample values
    rows = over_flower_wire(encode_rows(federation.score_clients(state, [0, 1])))
    for row in rows.config_records.values():
        assert set(row) <= {"client", "kind", "test_samples", "acc", "loss", "personal_acc", "personal_loss"}
        assert all(isinstance(value, (int, float, str)) for value in row.values())
