"""What a SuperNode holds: its partitions, its built federation pieces, its clients' state.

A node rebuilds the run's data and learner from the recipe the server sends,
deterministically from the recipe's seed, exactly as the in-process loop does, and
trains only the partitions its node config names. What a client keeps between
rounds (personal layers, ...) is stored in the node's Flower context state, so
it never leaves the node.
"""

from __future__ import annotations

import hashlib

from flwr.app import Context
from omegaconf import OmegaConf

from fedssl.backends.flower.codec import decode_arrays, encode_arrays
from fedssl.config.validate import validate
from fedssl.config.load import merge_config
from fedssl.errors import UserError
from fedssl.federation.loop import Federation

PARTITION_KEY = "partition-id"  # Flower's own name: the simulation engine sets it on each virtual node

# One built federation per recipe, per process: building data and the model takes
# seconds, and a simulation actor or a long-lived node answers many messages.
_BUILT: dict[str, Federation] = {}


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


def federation_for(recipe_yaml: str) -> Federation:
    """The federation pieces the recipe builds (cached per recipe)."""
    key = hashlib.sha256(recipe_yaml.encode()).hexdigest()
    if key not in _BUILT:
        cfg = validate(merge_config([OmegaConf.create(recipe_yaml)], source="the server's recipe"))
        _BUILT.clear()  # one run at a time: drop the previous recipe's tensors
        _BUILT[key] = Federation.build(cfg)
    return _BUILT[key]


def state_key(client_id: int) -> str:
    return f"fedssl.client{client_id}"


def load_state(context: Context, client_id: int) -> dict:
    record = context.state.array_records.get(state_key(client_id))
    return decode_arrays(record) if record is not None else {}


def save_state(context: Context, client_id: int, kept: dict) -> None:
    if kept:
        context.state[state_key(client_id)] = encode_arrays(kept, "kept state")
    elif state_key(client_id) in context.state:
        del context.state[state_key(client_id)]


