"""Cross-device populations: the `draw` partition scheme and packed client tables."""

from __future__ import annotations

import numpy as np
import pytest

from fedssl.config.schema import DataConfig, LabelsConfig, PartitionConfig
from fedssl.data.dataset import SourceData
from fedssl.data.federated import DrawnClients, FederatedData, PackedClients, build_federated_data
from fedssl.data.partition import partition
from fedssl.errors import UserError

from tests.data.test_federated import make_dataset

SOURCE = SourceData(train=make_dataset(300, identities=False))


def drawn(samples: int = 10, mode: str = "all", **labels) -> DataConfig:
    return DataConfig(partition=PartitionConfig(scheme="draw", samples_per_client=samples, local_test_fraction=0.2),
                      labels=LabelsConfig(mode=mode, **labels))


def test_a_drawn_population_may_outnumber_the_pool_and_costs_nothing_until_asked():
    fed = build_federated_data(SOURCE, drawn(), 100_000, seed=3)  # 100,000 clients over 240 training images
    assert isinstance(fed.clients, DrawnClients) and fed.num_clients == 100_000 and fed.shares_samples
    client = fed.clients[99_999]
    assert (len(client.labeled), len(client.unlabeled), len(client.test)) == (8, 0, 2)
    held = np.concatenate([client.labeled, client.test])
    assert len(np.unique(held)) == 10 and held.min() >= 0 and held.max() < len(fed.pool)
    with pytest.raises(IndexError):
        fed.clients[100_000]


def test_a_client_draws_the_same_samples_whatever_the_population_and_others_draw_others():
    small = build_federated_data(SOURCE, drawn(), 10, seed=3)
    large = build_federated_data(SOURCE, drawn(), 50_000, seed=3)
    for c in range(10):
        for kind in ("labeled", "unlabeled", "test"):
            assert np.array_equal(getattr(small.clients[c], kind), getattr(large.clients[c], kind))
    assert not np.array_equal(small.clients[0].labeled, small.clients[1].labeled)
    reseeded = build_federated_data(SOURCE, drawn(), 10, seed=4)
    assert not np.array_equal(small.clients[0].labeled, reseeded.clients[0].labeled)


def test_the_server_keeps_its_labeled_samples_out_of_every_drawn_client():
    fed = build_federated_data(SOURCE, drawn(mode="server", server_per_class=5), 2000, seed=0)
    server = set(fed.server_labeled.tolist())
    assert len(server) == 35
    for c in range(0, 2000, 7):
        client = fed.clients[c]
        assert len(client.labeled) == 0 and not server & set(client.unlabeled.tolist() + client.test.tolist())


def test_labels_at_the_clients_split_each_drawn_client():
    fed = build_federated_data(SOURCE, drawn(samples=20, mode="client", fraction=0.25), 500, seed=0)
    client = fed.clients[123]
    assert (len(client.labeled), len(client.unlabeled), len(client.test)) == (4, 12, 4)


def test_a_saved_drawn_partition_loads_back_as_it_was_drawn(tmp_path):
    fed = build_federated_data(SOURCE, drawn(), 300, seed=1)
    fed.save(tmp_path / "partition.npz")
    loaded = FederatedData.load(tmp_path / "partition.npz", fed.pool, fed.test)
    assert isinstance(loaded.clients, PackedClients) and loaded.shares_samples and loaded.num_clients == 300
    for c in (0, 151, 299):
        for kind in ("labeled", "unlabeled", "test"):
            assert np.array_equal(getattr(loaded.clients[c], kind), getattr(fed.clients[c], kind))


@pytest.mark.parametrize("samples", [0, 241, 2.5])
def test_a_draw_larger_than_the_pool_or_empty_names_its_key(samples):
    with pytest.raises(UserError, match="data.partition.samples_per_client"):
        build_federated_data(SOURCE, drawn(samples=samples), 10, seed=0)


def test_draw_is_only_drawn_client_by_client():
    with pytest.raises(ValueError, match="client by client"):
        partition(PartitionConfig(scheme="draw"), np.zeros(10, np.int64), None, 2, np.random.default_rng(0))


def test_packed_clients_hold_one_flat_array_per_split():
    fed = build_federated_data(SOURCE, DataConfig(partition=PartitionConfig(scheme="iid")), 7, seed=0)
    assert isinstance(fed.clients, PackedClients) and not fed.shares_samples
    assert len(fed.clients.flat("labeled")) == sum(len(c.labeled) for c in fed.clients)
    assert fed.clients[-1].client_id == 6 and [c.client_id for c in fed.clients[2:4]] == [2, 3]
    assert np.array_equal(fed.clients.sizes("test"), [len(c.test) for c in fed.clients])
