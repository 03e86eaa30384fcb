from fedssl.config.schema import FederationConfig
from fedssl.federation.sampling import clients_per_round, sample_clients
from fedssl.federation.tensors import batch_indices
import numpy as np


def test_sampling_is_seeded_and_distinct():
    a = sample_clients(100, 10, seed=1, round_index=3)
    assert a == sample_clients(100, 10, seed=1, round_index=3)
    assert len(set(a)) == 10 and all(0 <= c < 100 for c in a)
    assert a != sample_clients(100, 10, seed=1, round_index=4)
    assert a != sample_clients(100, 10, seed=2, round_index=3)


def test_count_or_fraction():
    assert clients_per_round(FederationConfig(clients=20, clients_per_round=5)) == 5
    assert clients_per_round(FederationConfig(clients=20, client_fraction=0.25)) == 5
    assert clients_per_round(FederationConfig(clients=3, client_fraction=0.1)) == 1


def test_batches_cover_each_epoch_once():
    indices = np.arange(10, 33)
    batches = list(batch_indices(indices, 5, epochs=2, steps=0, rng=np.random.default_rng(0)))
    assert len(batches) == 10  # 23 samples -> 5 batches per epoch, the last of 3
    first_epoch = np.concatenate(batches[:5])
    assert sorted(first_epoch.tolist()) == indices.tolist()


def test_fixed_steps_cycle_through_the_data():
    batches = list(batch_indices(np.arange(7), 3, epochs=1, steps=5, rng=np.random.default_rng(0)))
    assert len(batches) == 5
