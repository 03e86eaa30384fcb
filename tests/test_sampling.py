from itertools import islice

import numpy as np
import pytest

from fedssl.config.schema import FederationConfig, TrainConfig
from fedssl.inprocess.trainer import round_steps
from fedssl.sampling import clients_per_round, evaluation_cohort, nth_remaining, sample_clients, sample_cohort
from fedssl.data.tensors import batches_per_pass, cycle_batches


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
