"""Pure partitioners: split a training pool of N samples across clients.

Every function but `draw_client` returns a list of `num_clients` sorted int64 arrays
of indices into the pool it was given (positions 0..N-1). Together they cover every
index exactly once: no sample is in two clients and none is lost. Each is
deterministic given the numpy `Generator` passed in; none keeps state or touches
global randomness.

Schemes (chosen by `data.partition.scheme`):

- ``iid``: a uniform random split into near-equal parts.
- ``dirichlet``: label skew; for every class, the share each client gets is drawn
  from Dirichlet(alpha) (Hsu et al. 2019, "Measuring the Effects of Non-Identical
  Data Distribution for Federated Visual Classification"; the variant of PFLlib /
  NIID-Bench, which stops giving a class to clients already above the mean size).
- ``shards``: pathological label skew (McMahan et al. 2017): sort by label, cut into
  ``num_clients * classes_per_client`` shards, deal ``classes_per_client`` to each.
- ``natural``: feature skew by identity; a client is one person (or a group of
  whole persons).
- ``draw``: a cross-device population, possibly larger than the pool (100,000 phones
  over Fashion-MNIST's 60,000 images): each client holds ``samples_per_client``
  distinct samples drawn uniformly from the pool by its own generator, seeded from
  (seed, client). Clients may share samples (the draw is with replacement across
  clients), so the partition covers the pool only in expectation; in exchange a
  client's samples are computed when it is first needed, in time and memory
  independent of the population size (`draw_client`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedssl.config.schema import PartitionConfig
from fedssl.errors import UserError
from fedssl.registry import did_you_mean

SCHEMES = ("iid", "dirichlet", "shards", "natural", "draw")

DIRICHLET_MAX_ATTEMPTS = 1000


def _check_clients(num_clients: int, num_samples: int) -> None:
    if int(num_clients) != num_clients or num_clients < 1:
        raise UserError(f"federation.clients: must be a positive integer, got {num_clients!r}")
    if num_clients > num_samples:
        raise UserError(
            f"federation.clients: {num_clients} clients but only {num_samples} samples to partition; "
            "every client needs at least one sample"
        )


def _as_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {labels.shape}")
    return labels.astype(np.int64, copy=False)


def _finish(parts: Sequence[np.ndarray]) -> list[np.ndarray]:
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def partition_iid(num_samples: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A uniform random split of range(num_samples) into near-equal parts
    (sizes differ by at most one)."""
    _check_clients(num_clients, num_samples)
    return _finish(np.array_split(rng.permutation(num_samples), num_clients))


def partition_dirichlet(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_samples: int = 10,
    max_attempts: int = DIRICHLET_MAX_ATTEMPTS,
) -> list[np.ndarray]:
    """Label skew: for each class, the proportions of its samples going to each
    client are drawn from Dirichlet(alpha, ..., alpha).

    As in PFLlib, a client that already holds at least N / num_clients samples gets
    no share of the classes dealt after that, which keeps client sizes from drifting
    apart. The whole draw is repeated until every client holds at least
    `min_samples` samples; after `max_attempts` draws a `UserError` names
    `data.partition.min_samples` and `data.partition.alpha`.

    Small alpha (0.1) gives each client few classes; large alpha (100) approaches iid.
    """
    labels = _as_labels(labels)
    n = len(labels)
    _check_clients(num_clients, n)
    if not np.isfinite(alpha) or alpha <= 0:
        raise UserError(f"data.partition.alpha: must be > 0, got {alpha!r}")
    if min_samples < 0:
        raise UserError(f"data.partition.min_samples: must be >= 0, got {min_samples!r}")
    if min_samples * num_clients > n:
        raise UserError(
            f"data.partition.min_samples: {num_clients} clients x {min_samples} samples is more than "
            f"the {n} samples in the pool; lower data.partition.min_samples or federation.clients"
        )

    class_indices = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    mean_size = n / num_clients
    smallest = 0
    for _ in range(max(1, max_attempts)):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        sizes = np.zeros(num_clients, dtype=np.int64)
        for idx in class_indices:
            idx = rng.permutation(idx)
            proportions = rng.dirichlet(np.full(num_clients, float(alpha)))
            proportions = proportions * (sizes < mean_size)
            total = proportions.sum()
            if not np.isfinite(total) or total <= 0:
                # Numerically degenerate draw (tiny alpha): fall back to an even share
                # among the clients still below the mean size.
                proportions = (sizes < mean_size).astype(np.float64)
                total = proportions.sum()
            proportions = proportions / total
            cuts = (np.cumsum(proportions) * len(idx)).astype(np.int64)[:-1]
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].append(chunk)
                sizes[client] += len(chunk)
        smallest = int(sizes.min())
        if smallest >= min_samples:
            return _finish([np.concatenate(p) if p else np.empty(0, np.int64) for p in parts])
    raise UserError(
        f"data.partition.min_samples: after {max_attempts} Dirichlet draws with data.partition.alpha={alpha} "
        f"some of the {num_clients} clients still held fewer than {min_samples} samples "
        f"(last draw's smallest client: {smallest}); lower data.partition.min_samples, raise "
        "data.partition.alpha, or use fewer federation.clients"
    )


def _shards_per_class(counts: np.ndarray, num_shards: int, num_clients: int) -> np.ndarray:
    """How many shards each class is cut into: at least one each, the rest given out
    by the D'Hondt rule (proportional to class size), at most one shard per sample
    and, while possible, at most one shard per client (so no client needs two shards
    of the same class)."""
    shards = np.ones(len(counts), dtype=np.int64)
    for _ in range(num_shards - len(counts)):
        room = shards < np.minimum(counts, num_clients)
        if not room.any():
            room = shards < counts
        if not room.any():  # fewer samples than shards; the caller rules this out
            raise AssertionError("more shards than samples")
        score = np.where(room, counts / shards, -np.inf)
        shards[int(np.argmax(score))] += 1
    return shards


def partition_shards(
    labels: np.ndarray,
    num_clients: int,
    classes_per_client: int,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """Pathological label skew after McMahan et al. 2017: sort the pool by label,
    cut it into `num_clients * classes_per_client` shards and deal
    `classes_per_client` shards to each client.

    Shards are cut along class boundaries (a class of n_c samples is cut into a
    number of shards proportional to n_c), so a shard never straddles two classes
    and every client holds at most `classes_per_client` classes; exactly that many
    whenever no class needs more shards than there are clients. Shards are dealt at
    random, as in the paper; a client dealt two shards of one class then swaps one
    with another client (random valid swaps). If no such swaps are found (or cannot
    exist), the shards are dealt round-robin over a random class order instead,
    which spreads each class's shards over as many clients as possible.
    """
    labels = _as_labels(labels)
    n = len(labels)
    _check_clients(num_clients, n)
    classes = np.unique(labels)
    if int(classes_per_client) != classes_per_client or not 1 <= classes_per_client <= len(classes):
        raise UserError(
            f"data.partition.classes_per_client: must be between 1 and the {len(classes)} classes "
            f"in the training pool, got {classes_per_client!r}"
        )
    num_shards = num_clients * classes_per_client
    if num_shards < len(classes):
        raise UserError(
            f"data.partition.classes_per_client: {num_clients} clients x {classes_per_client} classes "
            f"cannot cover the {len(classes)} classes in the training pool; raise "
            "data.partition.classes_per_client or federation.clients"
        )
    if num_shards > n:
        raise UserError(
            f"data.partition.classes_per_client: {num_clients} clients x {classes_per_client} shards "
            f"is more than the {n} samples in the pool; lower data.partition.classes_per_client "
            "or federation.clients"
        )
    class_indices = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    counts = np.array([len(i) for i in class_indices])
    per_class = _shards_per_class(counts, num_shards, num_clients)
    shards: list[np.ndarray] = []
    shard_class: list[int] = []
    for c in rng.permutation(len(classes)):
        shards.extend(np.array_split(class_indices[c], per_class[c]))
        shard_class.extend([c] * per_class[c])
    table = None
    if per_class.max() <= num_clients:
        table = _deal_distinct(np.array(shard_class), num_clients, classes_per_client, rng)
    if table is None:  # round-robin: shard at position p goes to slot p % num_clients
        table = np.arange(num_shards).reshape(classes_per_client, num_clients).T[rng.permutation(num_clients)]
    return _finish([np.concatenate([shards[s] for s in row]) for row in table])


def _deal_distinct(
    shard_class: np.ndarray, num_clients: int, per_client: int, rng: np.random.Generator, max_swaps: int | None = None
) -> np.ndarray | None:
    """Deal shards at random, `per_client` to each client, then repair clients holding
    two shards of one class by random swaps that fix them without breaking the other
    client. Returns a (num_clients, per_client) table of shard ids, or None if the
    repair did not finish."""
    table = rng.permutation(len(shard_class)).reshape(num_clients, per_client)
    for _ in range(max_swaps if max_swaps is not None else 10 * len(shard_class) + 100):
        cls = shard_class[table]
        ordered = np.sort(cls, axis=1)
        bad = np.flatnonzero((ordered[:, 1:] == ordered[:, :-1]).any(axis=1))
        if len(bad) == 0:
            return table
        i = int(bad[rng.integers(len(bad))])
        row = cls[i]
        values, counts = np.unique(row, return_counts=True)
        dup_positions = np.flatnonzero(np.isin(row, values[counts > 1]))
        a = int(dup_positions[rng.integers(len(dup_positions))])
        # (j, b) is a valid partner if shard class cls[j, b] is new to client i and
        # client j does not hold class row[a] yet.
        ok = ~np.isin(cls, row) & ~(cls == row[a]).any(axis=1, keepdims=True)
        ok[i] = False
        candidates = np.argwhere(ok)
        if len(candidates) == 0:
            return None
        j, b = candidates[rng.integers(len(candidates))]
        table[i, a], table[j, b] = table[j, b], table[i, a]
    return None


def partition_natural(identities: np.ndarray, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Partition by identity: every client holds whole identities (persons).

    With as many clients as identities, each client is one identity (in random
    order). With fewer clients, the identities are shuffled and dealt round-robin,
    so clients hold ceil or floor of (identities / clients) persons each. More
    clients than identities is a `UserError` naming `federation.clients`.
    """
    identities = np.asarray(identities)
    if identities.ndim != 1:
        raise ValueError(f"identities must be one-dimensional, got shape {identities.shape}")
    _check_clients(num_clients, len(identities))
    unique, inverse = np.unique(identities, return_inverse=True)
    if num_clients > len(unique):
        raise UserError(
            f"federation.clients: {num_clients} clients but the training pool has only {len(unique)} "
            "identities; the natural partition gives every client at least one whole identity"
        )
    client_of_identity = np.empty(len(unique), dtype=np.int64)
    client_of_identity[rng.permutation(len(unique))] = np.arange(len(unique)) % num_clients
    owner = client_of_identity[inverse.reshape(-1)]
    return _finish([np.flatnonzero(owner == c) for c in range(num_clients)])


def check_draw(samples_per_client: int, num_samples: int) -> None:
    """A `UserError` naming data.partition.samples_per_client unless a `draw` client
    can hold that many distinct samples of a pool of `num_samples`."""
    if int(samples_per_client) != samples_per_client or not 1 <= samples_per_client <= num_samples:
        raise UserError(f"data.partition.samples_per_client: scheme draw needs between 1 and the {num_samples} "
                        f"samples of the training pool per client, got {samples_per_client!r}")


def draw_client(num_samples: int, samples_per_client: int, rng: np.random.Generator) -> np.ndarray:
    """One client of the ``draw`` scheme: `samples_per_client` distinct positions of
    range(num_samples), in the (uniformly random) order drawn by the client's own
    generator `rng`, so that any prefix is itself a uniform sample. For a small
    client of a large pool numpy draws them in O(samples_per_client) (Floyd's
    method), never a permutation of the pool."""
    return rng.choice(num_samples, size=samples_per_client, replace=False).astype(np.int64)


def partition(
    scheme_cfg: PartitionConfig,
    labels: np.ndarray,
    identities: np.ndarray | None,
    num_clients: int,
    rng: np.random.Generator,
    source: str | None = None,
) -> list[np.ndarray]:
    """Split a pool with these `labels` (and `identities`, or None) as
    `scheme_cfg.scheme` says. `source` (the `data.source` name) only makes the
    error for `natural` without identities more specific."""
    scheme = check_scheme(scheme_cfg.scheme)
    if scheme == "iid":
        return partition_iid(len(labels), num_clients, rng)
    if scheme == "dirichlet":
        return partition_dirichlet(labels, num_clients, scheme_cfg.alpha, rng, scheme_cfg.min_samples)
    if scheme == "shards":
        return partition_shards(labels, num_clients, scheme_cfg.classes_per_client, rng)
    if scheme == "draw":  # a client's draw is seeded by (seed, client), which `rng` is not
        raise ValueError("scheme draw is drawn client by client (draw_client), not partitioned at once")
    if identities is None:  # natural
        where = f"data.source {source}" if source else "the data source"
        raise UserError(f"data.partition.scheme: natural needs identities; {where} has none")
    return partition_natural(identities, num_clients, rng)


def check_scheme(scheme: str) -> str:
    """`scheme` if it is one of `SCHEMES`, else a `UserError` naming data.partition.scheme."""
    if scheme not in SCHEMES:
        raise UserError(f"data.partition.scheme: unknown scheme {scheme!r}{did_you_mean(str(scheme), list(SCHEMES))}; "
                        f"choose one of {', '.join(SCHEMES)}")
    return scheme
