from itertools import islice

import numpy as np
import pytest

from fedssl.config.schema import FederationConfig, TrainConfig
from fedssl.federation.client import round_steps
from fedssl.sampling import clients_per_round, evaluation_cohort, nth_remaining, sample_clients, sample_cohort
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


def listed_draw(num_clients, count, seed, round_index, attempt, excluded):
    """The draw as it was made before populations grew: from the list of every client that may train."""
    candidates = [c for c in range(num_clients) if c not in excluded]
    return [candidates[i] for i in sample_clients(len(candidates), min(count, len(candidates)), seed, round_index, attempt)]


@pytest.mark.parametrize("num_clients,count,excluded", [
    (20, 5, set()), (20, 5, {0, 3, 4, 19}), (50, 45, set(range(0, 50, 3))), (12, 12, {5}),
    (100_000, 100, set(range(10, 100_000, 997)) | {0, 1, 2}),
])
def test_a_cohort_is_drawn_without_listing_the_population_yet_is_the_listed_draw(num_clients, count, excluded):
    for round_index, attempt in [(1, 0), (7, 2)]:
        cohort = sample_cohort(num_clients, count, 5, round_index, attempt, excluded)
        assert cohort == listed_draw(num_clients, count, 5, round_index, attempt, excluded)
        assert not set(cohort) & excluded and len(cohort) == min(count, num_clients - len(excluded))


def test_nth_remaining_skips_the_ids_left_out():
    assert nth_remaining(np.arange(5), np.array([0, 2, 3])).tolist() == [1, 4, 5, 6, 7]
    assert nth_remaining(np.array([0, 1]), np.empty(0, np.int64)).tolist() == [0, 1]


def test_an_evaluation_cohort_is_every_client_or_a_seeded_sample_of_those_that_train():
    assert evaluation_cohort(6, 0, 0, 3, {1}) == [0, 2, 3, 4, 5]
    assert evaluation_cohort(6, 9, 0, 3, {1}) == [0, 2, 3, 4, 5]
    sampled = evaluation_cohort(100_000, 50, 0, 3, {7})
    assert len(sampled) == 50 and 7 not in sampled and sampled == sorted(sampled)
    assert sampled == evaluation_cohort(100_000, 50, 0, 3, {7}) != evaluation_cohort(100_000, 50, 0, 4, {7})
    assert sampled != sample_cohort(100_000, 50, 0, 3, 0, {7})  # a stream of its own: evaluating moves no training draw
