"""The pure partitioners of fedssl.data.partition."""

from __future__ import annotations

import numpy as np
import pytest

from fedssl.config.schema import PartitionConfig
from fedssl.data.partition import (
    partition,
    partition_dirichlet,
    partition_iid,
    partition_natural,
    partition_shards,
)
from fedssl.errors import UserError

NUM_CLASSES = 7


def make_labels(n: int = 1400, num_classes: int = NUM_CLASSES, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, num_classes, n).astype(np.int64)


def make_identities(n: int = 1400, num_identities: int = 20, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, num_identities, n).astype(np.int64)


def assert_exact_cover(parts: list[np.ndarray], n: int, num_clients: int) -> None:
    assert len(parts) == num_clients
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0), "indices sorted and unique within a client"
    everything = np.concatenate(parts)
    assert len(everything) == n, "counts add up"
    assert np.array_equal(np.sort(everything), np.arange(n)), "no sample in two clients, none lost"


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


LABELS = make_labels()
IDENTITIES = make_identities()

RUNNERS = {
    "iid": lambda g: partition_iid(len(LABELS), 10, g),
    "dirichlet": lambda g: partition_dirichlet(LABELS, 10, 0.5, g, min_samples=10),
    "shards": lambda g: partition_shards(LABELS, 10, 2, g),
    "natural": lambda g: partition_natural(IDENTITIES, 10, g),
}


@pytest.mark.parametrize("scheme", list(RUNNERS))
def test_exact_cover(scheme):
    assert_exact_cover(RUNNERS[scheme](rng(0)), len(LABELS), 10)


@pytest.mark.parametrize("scheme", list(RUNNERS))
def test_deterministic_from_seed(scheme):
    run = RUNNERS[scheme]
    assert same(run(rng(3)), run(rng(3)))
    assert not same(run(rng(3)), run(rng(4)))


def test_iid_sizes_balanced():
    parts = partition_iid(103, 10, rng())
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert_exact_cover(parts, 103, 10)


def test_single_client_gets_everything():
    assert_exact_cover(partition_iid(50, 1, rng()), 50, 1)
    assert_exact_cover(partition_dirichlet(LABELS, 1, 0.1, rng(), 1), len(LABELS), 1)
    assert_exact_cover(partition_shards(LABELS, 1, NUM_CLASSES, rng()), len(LABELS), 1)


def label_skew(parts: list[np.ndarray], labels: np.ndarray) -> tuple[float, float]:
    """(mean largest class share, mean label entropy) over clients."""
    shares, entropies = [], []
    for p in parts:
        q = np.bincount(labels[p], minlength=NUM_CLASSES) / len(p)
        shares.append(q.max())
        nz = q[q > 0]
        entropies.append(-(nz * np.log(nz)).sum())
    return float(np.mean(shares)), float(np.mean(entropies))


def test_dirichlet_alpha_controls_skew():
    labels = make_labels(2000)
    shares, entropies = [], []
    for alpha in (0.1, 1.0, 100.0):
        s, e = [], []
        for seed in range(3):
            parts = partition_dirichlet(labels, 10, alpha, rng(seed), min_samples=5)
            assert_exact_cover(parts, len(labels), 10)
            assert min(len(p) for p in parts) >= 5
            share, entropy = label_skew(parts, labels)
            s.append(share)
            e.append(entropy)
        shares.append(np.mean(s))
        entropies.append(np.mean(e))
    assert shares[0] > shares[1] > shares[2], shares
    assert entropies[0] < entropies[1] < entropies[2], entropies
    assert entropies[2] > 0.95 * np.log(NUM_CLASSES), "alpha=100 is close to iid"


def test_dirichlet_respects_min_samples():
    parts = partition_dirichlet(LABELS, 20, 0.1, rng(0), min_samples=20)
    assert min(len(p) for p in parts) >= 20
    assert_exact_cover(parts, len(LABELS), 20)


def test_dirichlet_gives_up_with_clear_error():
    with pytest.raises(UserError, match=r"data\.partition\.min_samples.*data\.partition\.alpha"):
        partition_dirichlet(LABELS, 20, 0.01, rng(0), min_samples=60, max_attempts=5)
    with pytest.raises(UserError, match=r"data\.partition\.min_samples"):
        partition_dirichlet(LABELS, 20, 1.0, rng(0), min_samples=100)  # 20 x 100 > 1400


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan")])
def test_dirichlet_bad_alpha(alpha):
    with pytest.raises(UserError, match=r"data\.partition\.alpha"):
        partition_dirichlet(LABELS, 10, alpha, rng(), 1)


@pytest.mark.parametrize("num_clients,classes_per_client", [(10, 1), (10, 2), (7, 3), (50, 2), (3, 7)])
def test_shards_limit_classes(num_clients, classes_per_client):
    parts = partition_shards(LABELS, num_clients, classes_per_client, rng(1))
    assert_exact_cover(parts, len(LABELS), num_clients)
    held = [len(np.unique(LABELS[p])) for p in parts]
    assert all(h == classes_per_client for h in held), held


def test_shards_pairs_are_random():
    labels = make_labels(2000)
    parts = partition_shards(labels, 60, 2, rng(0))
    pairs = {tuple(np.unique(labels[p])) for p in parts}
    assert len(pairs) >= 12, "shards of a class meet many different classes (of 21 pairs)"


def test_shards_with_a_dominant_class_never_exceed_classes_per_client():
    labels = np.array([0] * 1000 + [1] * 3 + [2] * 3, dtype=np.int64)
    parts = partition_shards(labels, 10, 2, rng(0))
    assert_exact_cover(parts, len(labels), 10)
    assert all(len(np.unique(labels[p])) <= 2 for p in parts)


@pytest.mark.parametrize("classes_per_client", [0, NUM_CLASSES + 1])
def test_shards_bad_classes_per_client(classes_per_client):
    with pytest.raises(UserError, match=r"data\.partition\.classes_per_client"):
        partition_shards(LABELS, 10, classes_per_client, rng())


def test_shards_cannot_cover_all_classes():
    with pytest.raises(UserError, match=r"data\.partition\.classes_per_client"):
        partition_shards(LABELS, 3, 2, rng())  # 6 shards for 7 classes


def test_natural_keeps_identities_whole():
    parts = partition_natural(IDENTITIES, 7, rng(0))
    assert_exact_cover(parts, len(IDENTITIES), 7)
    owners: dict[int, int] = {}
    for client, p in enumerate(parts):
        for identity in np.unique(IDENTITIES[p]):
            assert owners.setdefault(int(identity), client) == client, "identity split across clients"
    counts = [len(np.unique(IDENTITIES[p])) for p in parts]
    assert sorted(counts) == [2] * 1 + [3] * 6  # 20 identities dealt round-robin to 7 clients


def test_natural_one_identity_per_client():
    parts = partition_natural(IDENTITIES, 20, rng(0))
    assert_exact_cover(parts, len(IDENTITIES), 20)
    assert all(len(np.unique(IDENTITIES[p])) == 1 for p in parts)
    assert sorted(int(IDENTITIES[p[0]]) for p in parts) == list(range(20))


def test_natural_more_clients_than_identities():
    with pytest.raises(UserError, match=r"federation\.clients.*20 identities"):
        partition_natural(IDENTITIES, 21, rng())


@pytest.mark.parametrize("num_clients", [0, -2, len(LABELS) + 1])
@pytest.mark.parametrize("scheme", list(RUNNERS))
def test_bad_number_of_clients(scheme, num_clients):
    cfg = PartitionConfig(scheme=scheme, min_samples=0)
    with pytest.raises(UserError, match=r"federation\.clients"):
        partition(cfg, LABELS, IDENTITIES, num_clients, rng())


@pytest.mark.parametrize("scheme", list(RUNNERS))
def test_dispatch(scheme):
    cfg = PartitionConfig(scheme=scheme, alpha=0.5, classes_per_client=2, min_samples=10)
    assert same(partition(cfg, LABELS, IDENTITIES, 10, rng(5)), RUNNERS[scheme](rng(5)))


def test_unknown_scheme_suggests():
    with pytest.raises(UserError, match=r"data\.partition\.scheme.*'dirichelt'.*did you mean 'dirichlet'"):
        partition(PartitionConfig(scheme="dirichelt"), LABELS, None, 10, rng())


def test_natural_without_identities():
    with pytest.raises(UserError, match=r"data\.partition\.scheme: natural needs identities; data\.source idx has none"):
        partition(PartitionConfig(scheme="natural"), LABELS, None, 10, rng(), source="idx")
