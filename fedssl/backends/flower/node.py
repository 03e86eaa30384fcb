"""What a SuperNode holds: its partitions, its built federation pieces, its clients' state.

A node builds the run's learner from the recipe the server sends and trains only
the partitions (client ids) its node config names. Their data is either the
recipe's own partition, rebuilt deterministically from the recipe's seed exactly
as the in-process loop builds it, or, with node config `data-path`, the node's own
images, split over its partitions alone. What a client keeps between rounds
(personal layers, ...) is stored in the node's Flower context state, so it never
leaves the node, and only once the server has accepted the update it came with.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace

import numpy as np
from flwr.app import ConfigRecord, Context
from omegaconf import OmegaConf

from fedssl.backends.flower.codec import decode_arrays, encode_arrays
from fedssl.config.load import merge_config
from fedssl.config.schema import RecipeConfig
from fedssl.config.validate import validate
from fedssl.data.dataset import SourceData
from fedssl.data.federated import FederatedData, build_federated_data, node_federated_data
from fedssl.data.sources import load_source
from fedssl.errors import UserError
from fedssl.inprocess.clients import InProcessClients

PARTITION_KEY = "partition-id"  # Flower's own name: the simulation engine sets it on each virtual node
DATA_PATH_KEY = "data-path"  # the node's own images, in the recipe's data.source format

# One built set of clients per recipe, per process: building data and the model
# takes seconds, and a simulation actor or a long-lived node answers many messages.
_BUILT: dict[str, InProcessClients] = {}


def node_partitions(context: Context) -> list[int]:
    """The client ids this node trains: node config `partition-id`, an integer or a
    comma-separated list ("0,3")."""
    value = context.node_config.get(PARTITION_KEY)
    if value is None:
        raise UserError(f"node config: {PARTITION_KEY} is not set; start the node with "
                        f"--node-config \"{PARTITION_KEY}=0\"")
    try:
        return [int(part) for part in str(value).split(",") if part.strip()]
    except ValueError:
        raise UserError(f"node config: {PARTITION_KEY} must be an integer or a list like \"0,3\", got {value!r}") from None


def clients_for(recipe_yaml: str, context: Context, classes: list[str]) -> InProcessClients:
    """The clients the recipe builds on this node (cached per recipe and node
    config): their data, learner and state store, nothing of the server's. `classes` are the server's class names, which the node's own data
    must have too: the model's head and every score depend on them."""
    data_path, held = context.node_config.get(DATA_PATH_KEY), node_partitions(context)
    # The recipe's own data is the whole federation's, whatever partitions a node
    # holds: a simulation actor serving many virtual nodes builds it once. A node's
    # own data is split over the partitions it holds.
    own_split = held if data_path is not None else None
    key = hashlib.sha256(f"{recipe_yaml}\0{data_path}\0{own_split}".encode()).hexdigest()
    if key not in _BUILT:
        cfg = validate(merge_config([OmegaConf.create(recipe_yaml)], source="the server's recipe"))
        _BUILT.clear()  # one run at a time: drop the previous recipe's tensors
        if data_path is None:
            data = build_federated_data(load_source(cfg.data), cfg.data, cfg.federation.clients, cfg.seed)
        else:
            data = node_data(cfg, str(data_path), held, classes)
        _BUILT[key] = InProcessClients.build(cfg, data)
    found = list(_BUILT[key].data.class_names)
    if found != list(classes):
        where = f"node config {DATA_PATH_KEY}={data_path}" if data_path is not None else "the recipe's data on this node"
        raise UserError(f"{where}: classes {found} differ from the server's {list(classes)}")
    return _BUILT[key]


def node_data(cfg: RecipeConfig, data_path: str, held: list[int], classes: list[str]) -> FederatedData:
    """The node's own images at `data_path` as the data of the partitions it holds,
    labelled in the server's class order (a node may lack some classes)."""
    if cfg.data.source == "synthetic_faces":
        raise UserError(f"node config {DATA_PATH_KEY}: data.source synthetic_faces is generated, not read from "
                        f"files; use a recipe whose data.source reads files (folder, fer2013, idx)")
    local = replace(cfg.data, path=data_path)
    images = load_source(local).train
    unknown = sorted(set(images.class_names) - set(classes))
    if unknown:
        raise UserError(f"node config {DATA_PATH_KEY}={data_path}: classes {unknown} are not among the server's {classes}")
    order = np.array([classes.index(name) for name in images.class_names], dtype=images.labels.dtype)
    images = replace(images, labels=order[images.labels], class_names=tuple(classes))
    return node_federated_data(SourceData(images), local, cfg.federation.clients, held, cfg.seed)


def state_key(client_id: int) -> str:
    return f"fedssl.client{client_id}"


def pending_key(client_id: int) -> str:
    return f"fedssl.pending{client_id}"


def load_state(context: Context, client_id: int) -> dict:
    record = context.state.array_records.get(state_key(client_id))
    return decode_arrays(record) if record is not None else {}


def hold_state(context: Context, client_id: int, kept: dict, draw: str) -> None:
    """Hold what the client kept from a round of `draw` until the server says
    whether it accepted the client's update (`commit_state`)."""
    if kept:
        context.state[pending_key(client_id)] = encode_arrays(kept, "kept state")
        context.state[f"{pending_key(client_id)}.draw"] = ConfigRecord({"draw": draw})


def commit_state(context: Context, client_id: int, accepted: str) -> None:
    """The client's held state becomes its state if the server accepted its update of
    that draw (`accepted`: the draw of its last accepted update), and is dropped
    otherwise: as in the in-process loop, a client keeps only what it learned in
    rounds whose update the server used, not in dropped updates or redrawn rounds.
    A round that kept nothing leaves the earlier state."""
    key = pending_key(client_id)
    if key not in context.state:
        return
    if context.state.config_records[f"{key}.draw"]["draw"] == accepted:
        context.state[state_key(client_id)] = context.state.array_records[key]
    del context.state[key]
    del context.state[f"{key}.draw"]
