"""The federated view of a dataset: who holds which samples, and which are labeled.

`build_federated_data` turns a decoded `SourceData` and the recipe's `data` section
into a `FederatedData`: a training pool, the server's test set, and per client the
indices (into the pool) of its labeled, unlabeled and local-test samples. Everything
is deterministic from one seed; every step draws from its own stream
(`np.random.default_rng([seed, STEP, ...])`), so changing, say, the labeled split
does not move the partition.

Clients are stored compactly (`PackedClients`: one flat index array per split and
offsets) or, under the cross-device `draw` scheme, not at all (`DrawnClients`: a
client's view is computed from (seed, client) when asked for), so that a population
of 100,000 clients costs memory in proportion to the samples it holds, or to nothing.

Saving and loading: `FederatedData.save(path)` writes only the index arrays (one
.npz, atomically). `FederatedData.load(path, pool, test)` rebuilds the view on the
same pool and test set (typically rebuilt with `build_federated_data`, or decoded
again from the source) and checks that the pool is the one the partition was made on.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from fedssl.config.schema import DataConfig
from fedssl.data.dataset import ImageDataset, SourceData
from fedssl.data.partition import check_draw, draw_client, partition
from fedssl.errors import UserError
from fedssl.io import atomic_write
from fedssl.registry import did_you_mean

LABEL_MODES = ("all", "client", "server", "mixed")

# One random stream per step: np.random.default_rng([seed, STEP_*, ...]).
STEP_SERVER_TEST = 1
STEP_SERVER_LABELED = 2
STEP_PARTITION = 3
STEP_LOCAL_TEST = 4
STEP_CLIENT_LABELS = 5
STEP_MIXED_CLIENTS = 6

PARTITION_FORMAT = 1
_KINDS = ("labeled", "unlabeled", "test")

_EMPTY = np.empty(0, dtype=np.int64)


def _index_array(values) -> np.ndarray:
    return np.sort(np.asarray(values, dtype=np.int64).reshape(-1))


@dataclass(frozen=True)
class ClientData:
    """One client's share of the pool; every array holds sorted int64 indices into
    `FederatedData.pool`.

    Attributes:
        client_id: 0..num_clients-1.
        labeled: training samples whose labels the client may use.
        unlabeled: training samples the learner must treat as unlabeled (their labels
            exist in the pool only to measure pseudo-label accuracy).
        test: the client's local test split (labeled; evaluation only).
    """

    client_id: int
    labeled: np.ndarray
    unlabeled: np.ndarray
    test: np.ndarray

    @property
    def train(self) -> np.ndarray:
        """labeled and unlabeled together, sorted."""
        return np.sort(np.concatenate([self.labeled, self.unlabeled]))

    @property
    def num_samples(self) -> int:
        """labeled + unlabeled + test."""
        return len(self.labeled) + len(self.unlabeled) + len(self.test)


class PackedClients(Sequence):
    """Clients' index arrays packed into one flat int64 array per split, with offsets
    (compressed sparse rows): a client costs its indices and three offsets, not three
    numpy arrays and an object. Indexing gives a `ClientData` of views into them."""

    def __init__(self, clients: Sequence[ClientData], shared: bool = False):
        self.shared = shared  # whether clients may hold the same sample (a saved `draw` partition)
        parts: dict[str, list[np.ndarray]] = {kind: [] for kind in _KINDS}
        for position, client in enumerate(clients):  # once: a drawn client is drawn here
            if client.client_id != position:
                raise ValueError("client ids must be 0..num_clients-1 in order")
            for kind in _KINDS:
                parts[kind].append(np.asarray(getattr(client, kind), dtype=np.int64))
        self._flat = {kind: np.concatenate(p) if p else _EMPTY.copy() for kind, p in parts.items()}
        self._offsets = {kind: np.concatenate([[0], np.cumsum([len(a) for a in p], dtype=np.int64)])
                         for kind, p in parts.items()}

    def __len__(self) -> int:
        return len(self._offsets["test"]) - 1

    def __getitem__(self, client_id):
        if isinstance(client_id, slice):
            return [self[i] for i in range(*client_id.indices(len(self)))]
        client_id = range(len(self))[client_id]  # IndexError beyond the population, as a tuple's
        views = [self._flat[k][self._offsets[k][client_id]:self._offsets[k][client_id + 1]] for k in _KINDS]
        return ClientData(client_id, *views)

    def sizes(self, kind: str) -> np.ndarray:
        """Every client's number of `kind` ("labeled", "unlabeled", "test") samples."""
        return np.diff(self._offsets[kind])

    def flat(self, kind: str) -> np.ndarray:
        """Every client's `kind` indices, concatenated in client order."""
        return self._flat[kind]


class DrawnClients(Sequence):
    """The clients of the cross-device `draw` scheme, computed when asked for: client
    c's samples come from its own generator (seed, STEP_PARTITION, c); its local test
    split is its first draws (as many as `_local_test` takes: a uniform sample, not
    stratified, which would cost more than the draw), and its labels are split as
    under any scheme (`_split_labels`). Nothing is stored per client but a small cache
    of the last clients asked for, so the population's size costs no memory and no time."""

    CACHE = 1024  # a round's cohort, asked for by training, checks and scoring

    def __init__(self, num_clients: int, rest: np.ndarray, labels: np.ndarray, cfg: DataConfig, seed: int,
                 labeled_clients: frozenset[int]):
        check_draw(cfg.partition.samples_per_client, len(rest))
        self._num_clients, self._rest, self._labels = num_clients, rest, labels
        self._cfg, self._seed, self._labeled_clients = cfg, seed, labeled_clients
        self._cache: OrderedDict[int, ClientData] = OrderedDict()

    def __len__(self) -> int:
        return self._num_clients

    def __getitem__(self, client_id):
        if isinstance(client_id, slice):
            return [self[i] for i in range(*client_id.indices(len(self)))]
        client_id = range(self._num_clients)[client_id]
        if client_id in self._cache:
            self._cache.move_to_end(client_id)
            return self._cache[client_id]
        rng = np.random.default_rng([self._seed, STEP_PARTITION, client_id])
        held = self._rest[draw_client(len(self._rest), self._cfg.partition.samples_per_client, rng)]
        count = _local_test_count(len(held), self._cfg.partition.local_test_fraction)
        client = _split_labels(client_id, np.sort(held[:count]), np.sort(held[count:]), self._labels, self._cfg,
                               self._seed, client_id in self._labeled_clients)
        self._cache[client_id] = client
        if len(self._cache) > self.CACHE:
            self._cache.popitem(last=False)
        return client

    def __iter__(self) -> Iterator[ClientData]:
        return (self[i] for i in range(self._num_clients))


@dataclass(frozen=True)
class FederatedData:
    """The training pool, the server's test set, and who holds what.

    Attributes:
        pool: the training pool every index refers to.
        test: the server's test set (separate images, not indexed).
        clients: one `ClientData` per client, in client-id order (a `PackedClients`,
            a `DrawnClients`, or any sequence of them).
        server_labeled: indices into `pool` held, labeled, by the server; empty
            unless `data.labels.mode` is server or mixed with server_per_class > 0.
    """

    pool: ImageDataset
    test: ImageDataset
    clients: Sequence[ClientData]
    server_labeled: np.ndarray

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    @property
    def shares_samples(self) -> bool:
        """Whether two clients may hold the same sample (the cross-device `draw` scheme)."""
        return isinstance(self.clients, DrawnClients) or getattr(self.clients, "shared", False)

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.pool.class_names

    @property
    def num_classes(self) -> int:
        return self.pool.num_classes

    def class_counts(self, indices: np.ndarray) -> np.ndarray:
        """Samples per class among pool[indices], shape (num_classes,)."""
        return np.bincount(self.pool.labels[indices], minlength=self.num_classes).astype(np.int64)

    def client_class_counts(self) -> np.ndarray:
        """Training samples (labeled + unlabeled) per client and class, shape
        (num_clients, num_classes)."""
        return np.stack([self.class_counts(c.train) for c in self.clients]) if self.clients else (
            np.zeros((0, self.num_classes), dtype=np.int64)
        )

    def check(self) -> None:
        """Raise ValueError unless every index is in range and held at most once (under
        the `draw` scheme: at most once by each client, and never by a client and the
        server; drawn clients are correct by construction and are not all drawn here)."""
        if isinstance(self.clients, DrawnClients):
            _check_indices([self.server_labeled], len(self.pool))
            return
        if isinstance(self.clients, PackedClients):
            arrays = [self.clients.flat(k) for k in _KINDS]
        else:
            arrays = [getattr(c, k) for c in self.clients for k in _KINDS]
            if [c.client_id for c in self.clients] != list(range(len(self.clients))):
                raise ValueError("client ids must be 0..num_clients-1 in order")
        if not self.shares_samples:
            _check_indices([self.server_labeled] + arrays, len(self.pool))
            return
        _check_indices([self.server_labeled], len(self.pool))
        server = set(self.server_labeled.tolist())
        for c in self.clients:
            _check_indices([c.labeled, c.unlabeled, c.test], len(self.pool))
            if server.intersection(c.labeled.tolist() + c.unlabeled.tolist() + c.test.tolist()):
                raise ValueError("a pool index is held twice (by two clients, two splits, or client and server)")

    # -- persistence -------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write the partition (all index arrays and client ids, plus a fingerprint
        of the pool) as one .npz at `path`, atomically: a temporary file in the same
        folder is written, flushed and then renamed over `path`."""
        path = Path(path)
        arrays: dict[str, np.ndarray] = {
            "format": np.array(PARTITION_FORMAT, dtype=np.int64),
            "client_ids": np.array([c.client_id for c in self.clients], dtype=np.int64),
            "server_labeled": np.asarray(self.server_labeled, dtype=np.int64),
            "pool_size": np.array(len(self.pool), dtype=np.int64),
            "test_size": np.array(len(self.test), dtype=np.int64),
            "pool_fingerprint": np.array(_fingerprint(self.pool)),
            "shares_samples": np.array(int(self.shares_samples), dtype=np.int64),
        }
        # Packed first: a drawn population is drawn once here, client by client, not held as objects.
        packed = self.clients if isinstance(self.clients, PackedClients) else PackedClients(self.clients)
        for kind in _KINDS:
            arrays[kind] = packed.flat(kind)
            arrays[f"{kind}_sizes"] = packed.sizes(kind)
        atomic_write(path, lambda file: np.savez(file, **arrays))

    @staticmethod
    def load_partition(path: str | os.PathLike) -> dict:
        """The raw contents of a saved partition: {"client_ids", "server_labeled",
        "labeled", "unlabeled", "test" (lists of arrays, one per client),
        "pool_size", "test_size", "pool_fingerprint", "shares_samples"}. A `UserError` naming the file
        if it is missing or not a partition file."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                if int(z["format"]) != PARTITION_FORMAT:
                    raise UserError(f"{path}: partition format {int(z['format'])}, expected {PARTITION_FORMAT}")
                out: dict = {
                    "client_ids": z["client_ids"].astype(np.int64),
                    "server_labeled": z["server_labeled"].astype(np.int64),
                    "pool_size": int(z["pool_size"]),
                    "test_size": int(z["test_size"]),
                    "pool_fingerprint": str(z["pool_fingerprint"]),
                    "shares_samples": bool(int(z["shares_samples"])) if "shares_samples" in z else False,
                }
                for kind in _KINDS:
                    sizes = z[f"{kind}_sizes"].astype(np.int64)
                    out[kind] = np.split(z[kind].astype(np.int64), np.cumsum(sizes)[:-1])
                    if len(out[kind]) != len(out["client_ids"]):
                        raise KeyError(kind)
        except FileNotFoundError:
            raise UserError(f"{path}: no such partition file") from None
        except (KeyError, ValueError, OSError, zipfile.BadZipFile) as e:
            raise UserError(f"{path}: not a fedssl partition file ({type(e).__name__}: {e})") from None
        return out

    @classmethod
    def load(cls, path: str | os.PathLike, pool: ImageDataset, test: ImageDataset) -> FederatedData:
        """Rebuild a saved partition on `pool` and `test`; a `UserError` if the file
        was made on a different pool (size or labels differ) or test set size."""
        raw = cls.load_partition(path)
        if raw["pool_size"] != len(pool) or raw["pool_fingerprint"] != _fingerprint(pool):
            raise UserError(
                f"{path}: the partition was made on a different training pool "
                f"({raw['pool_size']} samples, this one has {len(pool)} or different labels); "
                "check data.* and seed"
            )
        if raw["test_size"] != len(test):
            raise UserError(f"{path}: the partition was made with a server test set of {raw['test_size']} "
                            f"samples, this one has {len(test)}")
        try:
            clients = PackedClients([
                ClientData(int(cid), _index_array(lab), _index_array(unl), _index_array(tst))
                for cid, lab, unl, tst in zip(raw["client_ids"], raw["labeled"], raw["unlabeled"], raw["test"])
            ], shared=raw["shares_samples"])
        except ValueError as e:
            raise UserError(f"{path}: inconsistent partition: {e}") from None
        fed = cls(pool=pool, test=test, clients=clients, server_labeled=_index_array(raw["server_labeled"]))
        try:
            fed.check()
        except ValueError as e:
            raise UserError(f"{path}: inconsistent partition: {e}") from None
        return fed


def _check_indices(arrays: list[np.ndarray], pool_size: int) -> None:
    everything = np.concatenate(arrays) if arrays else _EMPTY
    if len(everything) and (everything.min() < 0 or everything.max() >= pool_size):
        raise ValueError(f"an index is outside the pool of {pool_size} samples")
    if len(np.unique(everything)) != len(everything):
        raise ValueError("a pool index is held twice (by two clients, two splits, or client and server)")


def _fingerprint(dataset: ImageDataset) -> str:
    """A short hash of the pool's size, labels and class names (not the pixels)."""
    h = hashlib.sha1()
    h.update(np.int64(len(dataset)).tobytes())
    h.update(np.ascontiguousarray(dataset.labels, dtype=np.int64).tobytes())
    h.update("\0".join(dataset.class_names).encode())
    return h.hexdigest()[:16]


# -- helpers ----------------------------------------------------------------------


def _round(x: float) -> int:
    """Round half up (Python's round() rounds half to even)."""
    return int(np.floor(x + 0.5))


def _allocate(quotas: np.ndarray, total: int, caps: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Integers close to `quotas`, summing to `total`, each <= its cap: floors
    first, then the largest remainders (ties broken at random)."""
    quotas = np.minimum(np.asarray(quotas, dtype=np.float64), caps)
    take = np.floor(quotas).astype(np.int64)
    remainder = quotas - take + rng.random(len(quotas)) * 1e-9
    while take.sum() > total:  # only when the caller asks for less than the floors
        candidates = np.flatnonzero(take > 0)
        i = candidates[np.argmin(remainder[candidates])]
        take[i] -= 1
        remainder[i] += 1
    for i in np.argsort(-remainder, kind="stable"):
        if take.sum() >= total:
            break
        if take[i] < caps[i]:
            take[i] += 1
    while take.sum() < total:  # remainders exhausted; fill wherever there is room
        room = np.flatnonzero(take < caps)
        take[room[rng.integers(len(room))]] += 1
    return take


def _stratified_split(
    indices: np.ndarray, labels: np.ndarray, count: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Pick `count` of `indices` at random, per class in proportion to the class's
    share of `indices`. Returns (picked, rest), both sorted."""
    indices = np.asarray(indices, dtype=np.int64)
    if count <= 0 or len(indices) == 0:
        return _EMPTY.copy(), np.sort(indices)
    classes, inverse, counts = np.unique(labels[indices], return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    take = _allocate(counts * (count / len(indices)), count, counts, rng)
    picked = [rng.choice(indices[inverse == k], size=take[k], replace=False) for k in range(len(classes))]
    picked_all = np.concatenate(picked)
    rest = np.setdiff1d(indices, picked_all, assume_unique=True)
    return np.sort(picked_all), np.sort(rest)


def _check_fraction(value: float, key: str, *, low_open: bool = False, high_open: bool = False) -> None:
    ok_low = value > 0 if low_open else value >= 0
    ok_high = value < 1 if high_open else value <= 1
    if not (np.isfinite(value) and ok_low and ok_high):
        interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise UserError(f"{key}: must be in {interval}, got {value!r}")


def check_label_mode(mode: str) -> str:
    """`mode` if it is one of `LABEL_MODES`, else a `UserError` naming data.labels.mode."""
    if mode not in LABEL_MODES:
        raise UserError(f"data.labels.mode: unknown mode {mode!r}{did_you_mean(str(mode), list(LABEL_MODES))}; "
                        f"choose one of {', '.join(LABEL_MODES)}")
    return mode


def _validate(cfg: DataConfig, has_test: bool) -> None:
    labels = cfg.labels
    check_label_mode(labels.mode)
    if not has_test:
        _check_fraction(cfg.test_fraction, "data.test_fraction", low_open=True, high_open=True)
    _check_fraction(cfg.partition.local_test_fraction, "data.partition.local_test_fraction", high_open=True)
    _check_fraction(labels.fraction, "data.labels.fraction")
    _check_fraction(labels.labeled_clients, "data.labels.labeled_clients")
    if labels.per_class < 0:
        raise UserError(f"data.labels.per_class: must be >= 0, got {labels.per_class!r}")
    if labels.server_per_class < 0:
        raise UserError(f"data.labels.server_per_class: must be >= 0, got {labels.server_per_class!r}")
    if labels.mode == "server" and labels.server_per_class <= 0:
        raise UserError(
            "data.labels.server_per_class: labels.mode server needs server_per_class > 0 "
            "(the server holds the only labels)"
        )


# -- the steps ----------------------------------------------------------------------


def _server_test(source: SourceData, cfg: DataConfig, seed: int) -> tuple[ImageDataset, ImageDataset]:
    """(pool, server test set): the source's own test split, or a stratified
    `test_fraction` held out of its training data."""
    if source.test is not None:
        return source.train, source.test
    train = source.train
    n = len(train)
    count = min(max(_round(cfg.test_fraction * n), 1), n - 1) if n >= 2 else 0
    rng = np.random.default_rng([seed, STEP_SERVER_TEST])
    held, rest = _stratified_split(np.arange(n), train.labels, count, rng)
    return train.subset(rest), train.subset(held)


def _server_labeled(pool: ImageDataset, per_class: int, seed: int) -> np.ndarray:
    if per_class <= 0:
        return _EMPTY.copy()
    rng = np.random.default_rng([seed, STEP_SERVER_LABELED])
    counts = np.bincount(pool.labels, minlength=pool.num_classes)
    short = [f"{pool.class_names[c]!r} has {counts[c]}" for c in range(pool.num_classes) if counts[c] < per_class]
    if short:
        raise UserError(
            f"data.labels.server_per_class: the server needs {per_class} samples of every class but in "
            f"the training pool {', '.join(short)}; lower data.labels.server_per_class"
        )
    picked = [rng.choice(np.flatnonzero(pool.labels == c), size=per_class, replace=False)
              for c in range(pool.num_classes)]
    return np.sort(np.concatenate(picked))


def _local_test_count(n: int, fraction: float) -> int:
    """round(fraction * n); at least one if n >= 2 and fraction > 0, and never all n."""
    return 0 if fraction <= 0 or n < 2 else min(max(_round(fraction * n), 1), n - 1)


def _local_test(indices: np.ndarray, labels: np.ndarray, fraction: float, rng: np.random.Generator):
    """(test, train) of one client: `_local_test_count` samples, stratified."""
    count = _local_test_count(len(indices), fraction)
    if count == 0:
        return _EMPTY.copy(), np.sort(indices)
    return _stratified_split(indices, labels, count, rng)


def _client_labels(train: np.ndarray, labels: np.ndarray, cfg: DataConfig, rng: np.random.Generator):
    """(labeled, unlabeled) of one client's training samples under labels.mode client."""
    lc = cfg.labels
    if lc.per_class > 0:
        picked = []
        for c in np.unique(labels[train]):
            members = train[labels[train] == c]
            picked.append(rng.choice(members, size=min(lc.per_class, len(members)), replace=False))
        labeled = np.concatenate(picked) if picked else _EMPTY
    else:
        labeled = rng.choice(train, size=_round(lc.fraction * len(train)), replace=False)
    labeled = np.sort(labeled.astype(np.int64))
    return labeled, np.setdiff1d(train, labeled, assume_unique=True)


def build_federated_data(source: SourceData, cfg: DataConfig, num_clients: int, seed: int) -> FederatedData:
    """Split `source` across `num_clients` clients as `cfg` (the recipe's `data`
    section) says; deterministic from `seed`.

    1. Server test set: `source.test`, else a stratified `cfg.test_fraction` of
       `source.train`; the rest is the pool.
    2. Labels at the server (labels.mode server or mixed, server_per_class > 0):
       `server_per_class` samples of every class leave the pool for the server.
    3. The rest of the pool is partitioned by `cfg.partition.scheme` (under `draw`,
       each client draws its own samples from it when first asked for).
    4. A stratified `local_test_fraction` of each client becomes its local test split.
    5. Each client's training samples are split into labeled and unlabeled by
       `cfg.labels.mode`: all | client | server | mixed (see `LabelsConfig`).
    """
    _validate(cfg, has_test=source.test is not None)
    pool, test = _server_test(source, cfg, seed)

    lc = cfg.labels
    server_per_class = lc.server_per_class if lc.mode in ("server", "mixed") else 0
    server_labeled = _server_labeled(pool, server_per_class, seed)
    rest = np.setdiff1d(np.arange(len(pool), dtype=np.int64), server_labeled, assume_unique=True)

    identities = None if pool.identities is None else pool.identities[rest]
    parts = [] if cfg.partition.scheme == "draw" else partition(  # drawn client by client, when asked for
        cfg.partition, pool.labels[rest], identities, num_clients,
        np.random.default_rng([seed, STEP_PARTITION]), source=cfg.source,
    )

    labeled_clients: frozenset[int] = frozenset()
    if lc.mode == "mixed":
        num_labeled = _round(lc.labeled_clients * num_clients)
        rng = np.random.default_rng([seed, STEP_MIXED_CLIENTS])
        labeled_clients = frozenset(rng.choice(num_clients, size=num_labeled, replace=False).tolist())
    if cfg.partition.scheme == "draw":
        clients = DrawnClients(num_clients, rest, pool.labels, cfg, seed, labeled_clients)
    else:
        clients = PackedClients([_client_view(cid, rest[part], pool.labels, cfg, seed, cid in labeled_clients)
                                 for cid, part in enumerate(parts)])
    fed = FederatedData(pool=pool, test=test, clients=clients, server_labeled=server_labeled)
    fed.check()
    return fed


def _client_view(cid: int, held: np.ndarray, labels: np.ndarray, cfg: DataConfig, seed: int, labeled: bool
                 ) -> ClientData:
    """Client `cid`'s labeled, unlabeled and local test splits of the pool indices it
    `held`s (`labeled`: whether it is a labeled client of labels.mode mixed)."""
    test_idx, train = _local_test(
        held, labels, cfg.partition.local_test_fraction, np.random.default_rng([seed, STEP_LOCAL_TEST, cid]),
    )
    return _split_labels(cid, test_idx, train, labels, cfg, seed, labeled)


def _split_labels(cid: int, test_idx: np.ndarray, train: np.ndarray, labels: np.ndarray, cfg: DataConfig, seed: int,
                  labeled: bool) -> ClientData:
    """Client `cid` with its training samples `train` split into labeled and unlabeled
    by labels.mode, and its local test split `test_idx`."""
    lc = cfg.labels
    if lc.mode == "all" or (lc.mode == "mixed" and labeled):
        labeled_idx, unlabeled = train, _EMPTY.copy()
    elif lc.mode == "client":
        labeled_idx, unlabeled = _client_labels(train, labels, cfg, np.random.default_rng([seed, STEP_CLIENT_LABELS, cid]))
    else:  # server, or an unlabeled client of mixed
        labeled_idx, unlabeled = _EMPTY.copy(), train
    return ClientData(cid, _index_array(labeled_idx), _index_array(unlabeled), _index_array(test_idx))


def node_federated_data(source: SourceData, cfg: DataConfig, num_clients: int, held: list[int], seed: int
                        ) -> FederatedData:
    """A deployed node's data: its own images (`source`) split, as the recipe's
    `data` section says, over the client ids it holds (`held`) alone; every other
    client holds nothing here. Nothing is set aside for the server (its test set and
    its labels are its own), so every image on the node trains or tests its clients:
    with labels at the server, the node's clients hold no labels."""
    labels = replace(cfg.labels, server_per_class=0)
    if cfg.labels.mode == "server":
        labels = replace(labels, mode="client", per_class=0, fraction=0.0)
    local = replace(cfg, labels=labels)
    if len(held) == 1:  # all of it is that client's: no scheme needed (files rarely name identities)
        local = replace(local, partition=replace(cfg.partition, scheme="iid"))
    nothing = source.train.subset(_EMPTY)
    built = build_federated_data(SourceData(source.train, test=nothing), local, len(held), seed)
    clients = [ClientData(c, _EMPTY, _EMPTY, _EMPTY) for c in range(num_clients)]
    for part, client_id in zip(built.clients, held):
        clients[client_id] = replace(part, client_id=client_id)
    return replace(built, clients=PackedClients(clients, shared=built.shares_samples))
