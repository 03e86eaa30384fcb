from itertools import islice

import numpy as np
import pytest

from fedssl.config.schema import FederationConfig, TrainConfig
from fedssl.federation.client import round_steps
from fedssl.sampling import clients_per_round, sample_clients
from fedssl.federation.tensors import batches_per_pass, cycle_batches


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
    stream = cycle_batches(indices, 5, rng=np.random.default_rng(0), drop_last=False)
    cfg = TrainConfig(batch_size=5, local_epochs=2, drop_last=False)
    batches = list(islice(stream, round_steps(len(indices), 0, cfg, 0)))
    assert len(batches) == 10  # 23 samples -> 5 batches per epoch, the last of 3
    assert [len(b) for b in batches[:5]] == [5, 5, 5, 5, 3]
    assert sorted(np.concatenate(batches[:5]).tolist()) == indices.tolist()
    assert sorted(np.concatenate(batches[5:]).tolist()) == indices.tolist()


def test_drop_last_ends_each_pass_at_its_last_full_batch():
    indices = np.arange(10, 33)
    cfg = TrainConfig(batch_size=5, local_epochs=2)
    assert cfg.drop_last, "the default: no short step"
    assert round_steps(len(indices), 0, cfg, 0) == 8  # 23 samples -> 4 full batches per epoch
    batches = list(islice(cycle_batches(indices, 5, np.random.default_rng(0), drop_last=True), 8))
    assert all(len(b) == 5 for b in batches)
    for epoch in (batches[:4], batches[4:]):  # 20 distinct samples a pass, 3 left for a later shuffle
        assert len(set(np.concatenate(epoch).tolist())) == 20
    assert len(set(np.concatenate(batches).tolist())) > 20, "each pass reshuffles, so the dropped ones come back"
    # the same shuffle as without drop_last: only the short batch is left out
    kept = list(islice(cycle_batches(indices, 5, np.random.default_rng(0), drop_last=False), 5))
    assert all(np.array_equal(a, b) for a, b in zip(batches[:4], kept[:4]))


@pytest.mark.parametrize("count, steps_kept, steps_dropped", [(21, 3, 2), (20, 2, 2), (7, 1, 1), (1, 1, 1), (0, 0, 0)])
def test_a_client_smaller_than_a_batch_still_trains_on_it(count, steps_kept, steps_dropped):
    assert batches_per_pass(count, 10, drop_last=False) == steps_kept
    assert batches_per_pass(count, 10, drop_last=True) == steps_dropped
    if count:
        first = next(cycle_batches(np.arange(count), 10, np.random.default_rng(0), drop_last=True))
        assert len(first) == min(count, 10)


def test_steps_follow_the_larger_of_labeled_and_unlabeled():
    cfg = TrainConfig(batch_size=10, local_epochs=1, drop_last=False)
    assert round_steps(25, 0, cfg, 0) == 3
    assert round_steps(25, 700, cfg, 70) == 10  # 700 unlabeled in batches of 7 x 10
    assert round_steps(0, 700, cfg, 70) == 10
    assert round_steps(25, 700, TrainConfig(local_steps=4), 70) == 4
