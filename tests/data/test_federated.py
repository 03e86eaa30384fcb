"""build_federated_data, saving/loading a partition, and the data report."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fedssl.config.schema import DataConfig, LabelsConfig, PartitionConfig
from fedssl.data.dataset import FER2013_CLASSES, ImageDataset, SourceData
from fedssl.data.federated import ClientData, FederatedData, build_federated_data
from fedssl.data.report import client_table, plot_class_samples, plot_partition_heatmap
from fedssl.errors import UserError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_dataset(n: int = 700, channels: int = 1, identities: bool = True, seed: int = 0) -> ImageDataset:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(FER2013_CLASSES)), n // len(FER2013_CLASSES))
    labels = rng.permutation(np.concatenate([labels, rng.integers(0, 7, n - len(labels))])).astype(np.int64)
    return ImageDataset(
        images=rng.integers(0, 256, (n, 8, 8, channels), dtype=np.uint8),
        labels=labels,
        class_names=FER2013_CLASSES,
        identities=rng.integers(0, 20, n).astype(np.int64) if identities else None,
    )


SOURCE = SourceData(train=make_dataset())


def config(scheme: str = "iid", mode: str = "all", **labels) -> DataConfig:
    return DataConfig(
        partition=PartitionConfig(scheme=scheme, alpha=0.5, classes_per_client=2, min_samples=5),
        labels=LabelsConfig(mode=mode, **labels),
    )


def check_cover(fed: FederatedData) -> None:
    """Every pool index is held exactly once: by a client (labeled, unlabeled or
    test) or by the server."""
    arrays = [fed.server_labeled] + [getattr(c, k) for c in fed.clients for k in ("labeled", "unlabeled", "test")]
    for a in arrays:
        assert a.dtype == np.int64
        assert np.all(np.diff(a) > 0)
    everything = np.concatenate(arrays)
    assert np.array_equal(np.sort(everything), np.arange(len(fed.pool)))
    assert [c.client_id for c in fed.clients] == list(range(len(fed.clients)))


def same_partition(a: FederatedData, b: FederatedData) -> bool:
    if not np.array_equal(a.server_labeled, b.server_labeled) or len(a.clients) != len(b.clients):
        return False
    return all(
        np.array_equal(getattr(x, k), getattr(y, k))
        for x, y in zip(a.clients, b.clients)
        for k in ("labeled", "unlabeled", "test")
    )


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards", "natural"])
@pytest.mark.parametrize("mode", ["all", "client", "server", "mixed"])
def test_counts_add_up(scheme, mode):
    fed = build_federated_data(SOURCE, config(scheme, mode, per_class=2, server_per_class=3), 10, seed=0)
    assert len(fed.clients) == 10
    assert len(fed.pool) + len(fed.test) == len(SOURCE.train)
    check_cover(fed)


def test_server_test_holdout_is_stratified():
    fed = build_federated_data(SOURCE, config(), 5, seed=0)
    assert len(fed.test) == round(0.2 * len(SOURCE.train))
    expected = np.bincount(SOURCE.train.labels, minlength=7) * 0.2
    assert np.all(np.abs(np.bincount(fed.test.labels, minlength=7) - expected) <= 1)


def test_source_test_split_is_used():
    source = SourceData(train=make_dataset(350), test=make_dataset(70, seed=1))
    fed = build_federated_data(source, config(), 5, seed=0)
    assert fed.pool is source.train and fed.test is source.test
    check_cover(fed)


def test_local_test_split():
    fed = build_federated_data(SOURCE, config(), 10, seed=0)
    for c in fed.clients:
        n = c.num_samples
        assert len(c.test) == round(0.2 * n)
    # tiny clients still get one test sample; a fraction of 0 gives none
    tiny = SourceData(train=make_dataset(30), test=make_dataset(10))
    cfg = config()
    cfg.partition.local_test_fraction = 0.01
    assert all(len(c.test) == 1 for c in build_federated_data(tiny, cfg, 10, seed=0).clients)
    cfg.partition.local_test_fraction = 0.0
    assert all(len(c.test) == 0 for c in build_federated_data(tiny, cfg, 10, seed=0).clients)


def test_deterministic_from_seed():
    cfg = config("dirichlet", "client", fraction=0.3)
    a = build_federated_data(SOURCE, cfg, 10, seed=7)
    b = build_federated_data(SOURCE, cfg, 10, seed=7)
    c = build_federated_data(SOURCE, cfg, 10, seed=8)
    assert same_partition(a, b) and np.array_equal(a.test.labels, b.test.labels)
    assert not same_partition(a, c)


def test_labels_change_does_not_move_partition():
    """Steps draw from separate streams: the labeled split does not change who holds what."""
    a = build_federated_data(SOURCE, config("dirichlet", "client", fraction=0.3), 10, seed=7)
    b = build_federated_data(SOURCE, config("dirichlet", "client", fraction=0.6), 10, seed=7)
    for x, y in zip(a.clients, b.clients):
        assert np.array_equal(x.test, y.test) and np.array_equal(x.train, y.train)


def test_mode_all():
    fed = build_federated_data(SOURCE, config(mode="all", server_per_class=5), 10, seed=0)
    assert all(len(c.unlabeled) == 0 and len(c.labeled) > 0 for c in fed.clients)
    assert len(fed.server_labeled) == 0, "server_per_class only applies to server/mixed"


def test_mode_client_per_class():
    fed = build_federated_data(SOURCE, config("dirichlet", "client", per_class=3), 10, seed=0)
    for c in fed.clients:
        train_counts = fed.class_counts(c.train)
        assert np.array_equal(fed.class_counts(c.labeled), np.minimum(train_counts, 3))
        assert len(c.unlabeled) == len(c.train) - len(c.labeled)


def test_mode_client_fraction():
    fed = build_federated_data(SOURCE, config(mode="client", fraction=0.25), 10, seed=0)
    for c in fed.clients:
        assert len(c.labeled) == int(np.floor(0.25 * len(c.train) + 0.5))
        assert len(c.unlabeled) > 0


def test_mode_server():
    fed = build_federated_data(SOURCE, config(mode="server", server_per_class=4), 10, seed=0)
    assert np.array_equal(fed.class_counts(fed.server_labeled), np.full(7, 4))
    assert all(len(c.labeled) == 0 and len(c.unlabeled) > 0 for c in fed.clients)
    check_cover(fed)


def test_mode_server_needs_server_labels():
    with pytest.raises(UserError, match=r"data\.labels\.server_per_class"):
        build_federated_data(SOURCE, config(mode="server"), 10, seed=0)


def test_server_per_class_too_large():
    with pytest.raises(UserError, match=r"data\.labels\.server_per_class.*'angry' has"):
        build_federated_data(SOURCE, config(mode="server", server_per_class=500), 10, seed=0)


@pytest.mark.parametrize("share,expected", [(0.5, 5), (0.3, 3), (0.0, 0), (1.0, 10)])
def test_mode_mixed(share, expected):
    fed = build_federated_data(SOURCE, config(mode="mixed", labeled_clients=share, server_per_class=2), 10, seed=0)
    labeled = [c for c in fed.clients if len(c.unlabeled) == 0 and len(c.labeled) > 0]
    unlabeled = [c for c in fed.clients if len(c.labeled) == 0 and len(c.unlabeled) > 0]
    assert len(labeled) == expected and len(unlabeled) == 10 - expected
    assert np.array_equal(fed.class_counts(fed.server_labeled), np.full(7, 2))


def test_unknown_scheme_suggests():
    with pytest.raises(UserError, match=r"data\.partition\.scheme.*did you mean 'shards'"):
        build_federated_data(SOURCE, config("shard"), 10, seed=0)


def test_unknown_mode_suggests():
    with pytest.raises(UserError, match=r"data\.labels\.mode.*did you mean 'mixed'"):
        build_federated_data(SOURCE, config(mode="mixd"), 10, seed=0)


def test_natural_without_identities():
    source = SourceData(train=make_dataset(identities=False))
    cfg = config("natural")
    cfg.source = "fer2013"
    with pytest.raises(UserError, match=r"natural needs identities; data\.source fer2013 has none"):
        build_federated_data(source, cfg, 10, seed=0)


def test_too_many_clients():
    with pytest.raises(UserError, match=r"federation\.clients"):
        build_federated_data(SOURCE, config(), 10_000, seed=0)
    with pytest.raises(UserError, match=r"federation\.clients"):
        build_federated_data(SOURCE, config("natural"), 21, seed=0)  # 20 identities


@pytest.mark.parametrize(
    "key,section,field,value",
    [
        ("data.labels.fraction", "labels", "fraction", 1.5),
        ("data.labels.labeled_clients", "labels", "labeled_clients", -0.1),
        ("data.partition.local_test_fraction", "partition", "local_test_fraction", 1.0),
        ("data.test_fraction", None, "test_fraction", 0.0),
        ("data.labels.per_class", "labels", "per_class", -1),
    ],
)
def test_bad_values_name_their_key(key, section, field, value):
    cfg = config(mode="client")
    setattr(getattr(cfg, section) if section else cfg, field, value)
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        build_federated_data(SOURCE, cfg, 10, seed=0)


def test_save_load_round_trip(tmp_path):
    fed = build_federated_data(SOURCE, config("dirichlet", "mixed", server_per_class=2), 10, seed=0)
    path = tmp_path / "sub" / "partition.npz"
    fed.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["partition.npz"], "no temporary file left behind"
    loaded = FederatedData.load(path, fed.pool, fed.test)
    assert same_partition(fed, loaded)
    assert all(isinstance(c, ClientData) for c in loaded.clients)
    raw = FederatedData.load_partition(path)
    assert list(raw["client_ids"]) == list(range(10)) and raw["pool_size"] == len(fed.pool)
    fed.save(path)  # overwriting works
    assert same_partition(fed, FederatedData.load(path, fed.pool, fed.test))


def test_load_rejects_other_pool_and_bad_files(tmp_path):
    fed = build_federated_data(SOURCE, config(), 5, seed=0)
    path = tmp_path / "partition.npz"
    fed.save(path)
    other = build_federated_data(SOURCE, config(), 5, seed=1)
    with pytest.raises(UserError, match="different training pool"):
        FederatedData.load(path, other.pool, other.test)
    with pytest.raises(UserError, match="no such partition file"):
        FederatedData.load(tmp_path / "missing.npz", fed.pool, fed.test)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not a fedssl partition file"):
        FederatedData.load(tmp_path / "junk.npz", fed.pool, fed.test)


def test_client_table_lists_every_client():
    fed = build_federated_data(SOURCE, config("shards", "mixed", server_per_class=2), 12, seed=0)
    table = client_table(fed)
    lines = table.splitlines()
    rows = {line.split()[0]: line for line in lines if line and line.split()[0] not in ("client", "class")}
    for c in fed.clients:
        row = rows[str(c.client_id)].split()
        assert row[1:5] == [str(c.num_samples), str(len(c.labeled)), str(len(c.unlabeled)), str(len(c.test))]
    assert "server" in rows and "total" in rows
    assert rows["total"].split()[1] == str(len(fed.pool) + len(fed.test))
    assert "angry" in lines[0] and "surpri" in lines[0]
    widths = {len(line) for line in lines if line.split()[0] in rows or line.startswith("client")}
    assert len(widths) == 1, "columns aligned"


@pytest.mark.parametrize("channels", [1, 3])
def test_plots_are_valid_pngs(tmp_path, channels):
    source = SourceData(train=make_dataset(210, channels=channels))
    fed = build_federated_data(source, config("dirichlet", "client", fraction=0.5), 4, seed=0)
    heat = tmp_path / "heatmap.png"
    grid = tmp_path / "samples.png"
    plot_partition_heatmap(fed, heat)
    plot_class_samples(fed.pool, grid, per_class=4, seed=0)
    for path in (heat, grid):
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heatmap.png", "samples.png"]
