from itertools import islice

import numpy as np

from fedssl.config.schema import FederationConfig, TrainConfig
from fedssl.federation.client import round_steps
from fedssl.sampling import clients_per_round, sample_clients
from fedssl.federation.tensors import cycle_batches


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


def test_batches_cover_each_pass_once():
    indices = np.arange(10, 33)
    stream = cycle_batches(indices, 5, rng=np.random.default_rng(0))
    batches = list(islice(stream, round_steps(len(indices), 0, TrainConfig(batch_size=5, local_epochs=2), 0)))
    assert len(batches) == 10  # 23 samples -> 5 batches per epoch, the last of 3
    assert sorted(np.concatenate(batches[:5]).tolist()) == indices.tolist()
    assert sorted(np.concatenate(batches[5:]).tolist()) == indices.tolist()


def test_steps_follow_the_larger_of_labeled_and_unlabeled():
    cfg = TrainConfig(batch_size=10, local_epochs=1)
    assert round_steps(25, 0, cfg, 0) == 3
    assert round_steps(25, 700, cfg, 70) == 10  # 700 unlabeled in batches of 7 x 10
    assert round_steps(0, 700, cfg, 70) == 10
    assert round_steps(25, 700, TrainConfig(local_steps=4), 70) == 4
