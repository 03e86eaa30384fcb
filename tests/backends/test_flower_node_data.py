"""A deployed node's own data (node config `data-path`): all of it goes to the
partitions the node holds, labelled in the server's class order, and what it holds
is what the server bounds the node's replies with."""

import shutil

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, RecordDict

from fedssl.backends.flower.client import app as client_app
from fedssl.backends.flower.node import clients_for
from fedssl.backends.flower.server import FlowerClients, node_answer
from fedssl.config.load import load_recipe, to_yaml
from fedssl.data.dataset import FER2013_CLASSES, SourceData
from fedssl.data.federated import node_federated_data
from fedssl.data.sources.synthetic_faces import generate_synthetic_faces
from fedssl.errors import UserError
from fedssl.inprocess.clients import InProcessClients, data_holdings
from fedssl.engine.federation import Federation
from fedssl.messages import Payload, Update
from fedssl.privacy.mechanism import CentralDP
from fedssl.tracking.run_logger import RunLogger


def node_context(partitions: str, data_path=None) -> Context:
    config = {"partition-id": partitions} | ({} if data_path is None else {"data-path": str(data_path)})
    return Context(run_id=1, node_id=1, node_config=config, state=RecordDict(), run_config={})


@pytest.mark.parametrize("mode", ["all", "client", "server"])
def test_every_image_of_the_node_goes_to_the_partitions_it_holds(tiny_recipe, mode):
    cfg = load_recipe(tiny_recipe, [f"data.labels.mode={mode}", "data.labels.per_class=2", "data.labels.server_per_class=2"])
    images = generate_synthetic_faces(90, 4, seed=1, image_size=28, channels=1)
    data = node_federated_data(SourceData(images), cfg.data, num_clients=6, held=[1, 4], seed=0)

    assert [c.client_id for c in data.clients] == list(range(6))
    assert all(data.clients[c].num_samples == 0 for c in (0, 2, 3, 5))
    held = np.concatenate([np.concatenate([data.clients[c].train, data.clients[c].test]) for c in (1, 4)])
    assert sorted(held.tolist()) == list(range(90))  # every image, once; none set aside for the server
    assert len(data.test) == 0 and len(data.server_labeled) == 0
    labeled = sum(len(data.clients[c].labeled) for c in (1, 4))
    assert (labeled == 0) == (mode == "server")


def test_a_node_folder_is_read_in_the_servers_class_order(tiny_recipe, tmp_path, write_faces):
    write_faces(tmp_path / "node", count=60, size=28, channels=1)
    for lacking in ("angry", "surprise"):  # a node need not hold every class
        shutil.rmtree(tmp_path / "node" / lacking)
    cfg = load_recipe(tiny_recipe, ["data.source=folder", f"data.path={tmp_path / 'server'}", "data.partition.scheme=iid"])
    clients = clients_for(to_yaml(cfg), node_context("0,2", tmp_path / "node"), list(FER2013_CLASSES))

    on_disk = sorted(p.name for p in (tmp_path / "node").iterdir())
    assert clients.data.class_names == FER2013_CLASSES and clients.model(clients.pool.images[:1]).shape[-1] == 7
    present = {FER2013_CLASSES[label] for label in clients.data.pool.labels.tolist()}
    assert present == set(on_disk)
    assert clients.data.clients[0].num_samples + clients.data.clients[2].num_samples == len(clients.data.pool)


def test_a_node_folder_with_a_class_the_server_lacks_is_refused(tiny_recipe, tmp_path, write_faces):
    write_faces(tmp_path / "node", count=40, size=28, channels=1)
    cfg = load_recipe(tiny_recipe, ["data.source=folder", "data.path=unused"])
    with pytest.raises(UserError, match=r"node config data-path=.*node: classes \[.*\] are not among the server's"):
        clients_for(to_yaml(cfg), node_context("0", tmp_path / "node"), ["cat", "dog"])


def test_a_generated_source_has_no_data_path(tiny_recipe, tmp_path):
    with pytest.raises(UserError, match="node config data-path: data.source synthetic_faces is generated"):
        clients_for(to_yaml(load_recipe(tiny_recipe)), node_context("0", tmp_path), list(FER2013_CLASSES))


def test_a_node_builds_only_its_clients_never_the_servers_side(tiny_recipe, monkeypatch):
    """No round engine, test set pool, DP mechanism or run logger on a node: it trains
    and scores its clients and nothing else."""
    def server_side(*args, **kwargs):
        raise AssertionError("a node built a server-side object")

    for owner, name in [(Federation, "build"), (Federation, "__init__"), (CentralDP, "build"), (RunLogger, "__init__")]:
        monkeypatch.setattr(owner, name, server_side)
    recipe = to_yaml(load_recipe(tiny_recipe, ["seed=41"]))  # a recipe no other test built on this process
    clients = clients_for(recipe, node_context("0,3"), list(FER2013_CLASSES))
    assert isinstance(clients, InProcessClients)
    weights = clients.trainer.learner.arrays(clients.trainer.shared_names)
    update, _ = clients.train(3, Payload(round=1, arrays=weights))
    assert isinstance(update, Update) and update.client_id == 3
    assert [row["client"] for row in clients.score_rows(weights, [0, 3])] == [0, 3]


def test_virtual_nodes_of_one_process_build_the_recipes_data_once(tiny_recipe, tmp_path, write_faces):
    recipe = to_yaml(load_recipe(tiny_recipe))
    first = clients_for(recipe, node_context("0"), list(FER2013_CLASSES))
    assert clients_for(recipe, node_context("3,4"), list(FER2013_CLASSES)) is first  # a simulation actor's nodes

    write_faces(tmp_path / "node", count=40, size=28, channels=1)
    on_files = to_yaml(load_recipe(tiny_recipe, ["data.source=folder", "data.path=unused", "data.partition.scheme=iid"]))
    own = clients_for(on_files, node_context("0", tmp_path / "node"), list(FER2013_CLASSES))
    other = clients_for(on_files, node_context("1,2", tmp_path / "node"), list(FER2013_CLASSES))
    assert other is not own  # a node's own images are split over the partitions it holds
    assert other.data.clients[0].num_samples == 0 and own.data.clients[0].num_samples > 0


def test_what_a_node_with_its_own_data_declares_bounds_its_replies(tiny_recipe, tmp_path, write_faces, loopback_grid):
    for seed, folder in enumerate(("server", "node")):
        write_faces(tmp_path / folder, count=60, seed=seed, size=28, channels=1)
    cfg = load_recipe(tiny_recipe, ["data.source=folder", f"data.path={tmp_path / 'server'}", "data.partition.scheme=iid",
                                    "federation.clients=3", "federation.clients_per_round=3"])
    grid = loopback_grid(client_app, {7: {"partition-id": "0,2", "data-path": str(tmp_path / "node")},
                                      8: {"partition-id": "1"}})  # node 8 rebuilds the recipe's partition
    server = Federation.build(cfg, clients=lambda federation: FlowerClients.on_grid(federation, grid))

    on_node = data_holdings(clients_for(to_yaml(cfg), grid.contexts[7], list(server.data.class_names)).data)
    own = data_holdings(server.data)
    assert server.holdings == {0: on_node[0], 1: own[1], 2: on_node[2]}
    assert on_node[0] != own[0] and on_node[0].examples + on_node[2].examples > own[0].examples + own[2].examples


@pytest.mark.parametrize("answer", [{"partitions": [0], "kinds": ["labeled"]},
                                    {"partitions": [0], "kinds": ["labeled"], "examples": [5], "test_samples": [],
                                     "own_data": True},
                                    {"partitions": [0], "kinds": ["labeled"], "examples": [5], "test_samples": [1],
                                     "own_data": "yes"}])
def test_a_malformed_answer_to_the_query_stops_the_run_naming_the_node(answer):
    with pytest.raises(UserError, match=r"node 9: its answer to the server's query is malformed"):
        node_answer(RecordDict({"run": ConfigRecord(answer)}), 9)
