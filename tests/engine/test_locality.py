"""Data locality, both directions, on both backends, for every registered algorithm.

Up: what a client sends is its model's arrays and scalar metrics, and what a node
sends back from an evaluation is one row of per-client scores per client it was
asked about: never images, labels or per-sample values.

Down: a node receives only what its own clients need. A train message carries the
client's payload: the model's shared arrays (MOCHA: under its coupled arrays' names,
the client's anchor, one combination of the other tasks' weights, never one
client's) and, for FedMatch, the helper models the server chose for that client. An evaluate message carries the global model.
No message carries the server's private state (`ServerState.extras`, FedMatch's:
every client's latest model, embeddings, snapshots, the helper map) or another client's
arrays (what it sent up, what it keeps), except a client's declared helpers.

In process, each client is its own node (what `InProcessClients.train` and
`score_rows` are handed is what it receives). On Flower, the real ServerApp side
(`FlowerClients`)
talks through Flower's wire format to the real ClientApp of three nodes holding two
clients each (`loopback_grid`); `tests/backends/test_flower_trust.py` checks the same
on the simulation engine for FedMatch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass, field

import pytest
import torch

from fedssl.backends.flower.client import app as client_app
from fedssl.backends.flower.codec import (decode_arrays, decode_evaluate, decode_payload, decode_rows, decode_update,
                                          encode_update)
from fedssl.backends.flower.node import state_key
from fedssl.backends.flower.server import FlowerClients
from fedssl.config.load import load_recipe
from fedssl.algorithms.aggregate import ServerState
from fedssl.algorithms.base import ALGORITHMS
from fedssl.engine.checks import ROW_KEYS
from fedssl.engine.federation import Federation
from fedssl.engine.run import add_evaluation
from fedssl.learners.selfsup import HEADS
from fedssl.messages import Arrays, Update, array_bytes

# Each algorithm runs with its own smoke settings (`Algorithm.smoke`), so that its paths
# run within two rounds: labels where its learner reads them, FedMatch's helpers, FedMA's
# matched conv1 sent as extras, MOCHA's anchor and share of the steps for each client.
# What this test adds, for its own subject (an algorithm needs no entry here):
FOR_LOCALITY = {
    # FedEMA's last online network kept per client too, beside BYOL's target network
    "fedaffect": ["algorithm.selfsup.update=fedema"],
    # every client in flight arrives each round, so that every training sent comes back: 12 trainings
    "fedbuff": ["algorithm.fedbuff.buffer_size=6"],
}
NODES = {100: "0,3", 101: "1,4", 102: "2,5"}  # Flower: three nodes, two clients each


def registered_algorithms() -> list[str]:
    return ALGORITHMS.names()


@dataclass
class Sent:
    """One message to a node: for `clients`, `arrays` (and `extras`) in `round`."""

    kind: str  # train | evaluate
    clients: list[int]
    round: int
    arrays: Arrays
    extras: Arrays = field(default_factory=dict)


@dataclass
class Traffic:
    """Everything that crossed between the server and the nodes in a run."""

    down: list[Sent] = field(default_factory=list)
    updates: list[Update] = field(default_factory=list)
    replies: list[tuple[list[int], list[dict]]] = field(default_factory=list)  # (clients asked, rows)
    states: dict[int, ServerState] = field(default_factory=dict)  # round -> the state its payloads came from
    kept: dict[int, Arrays] = field(default_factory=dict)  # client -> what it keeps, at the end
    bytes_down: int = 0
    bytes_up: int = 0


def fingerprint(array: torch.Tensor) -> tuple | None:
    """What identifies an array's contents; None for arrays too plain to belong to
    anyone (integers, constants such as a zero-initialized psi or unit variances)."""
    if not array.is_floating_point() or array.numel() < 2 or bool((array == array.flatten()[0]).all()):
        return None
    return str(array.dtype), tuple(array.shape), hashlib.sha1(array.contiguous().numpy().tobytes()).hexdigest()


def fingerprints(arrays: Arrays) -> set[tuple]:
    return {f for f in map(fingerprint, arrays.values()) if f is not None}


def run_rounds(federation: Federation, traffic: Traffic, rounds: int = 2) -> None:
    """`rounds` rounds as `run_federation` runs them, the last one evaluated; their bytes."""
    payload = federation.algorithm.payload

    def recording_payload(round_index, state, client_id):  # the state each round's payloads are built from
        traffic.states[round_index] = state
        return payload(round_index, state, client_id)

    federation.algorithm.payload = recording_payload
    state = federation.initial_state()
    for round_index in range(1, rounds + 1):
        state, metrics = federation.fit_round(round_index, state)
        if round_index == rounds:
            metrics = add_evaluation(metrics, federation.evaluate(state)[0])
        assert metrics["dropped_clients"] == 0
        traffic.bytes_down += metrics["bytes_down"]
        traffic.bytes_up += metrics["bytes_up"]


def inprocess_traffic(cfg) -> tuple[Federation, Traffic]:
    """In process every client is its own node: it is handed its payload and, to be
    scored, the global weights."""
    federation, traffic = Federation.build(cfg), Traffic()
    clients = federation.clients
    train, score_rows = clients.train, clients.score_rows

    def recording_train(client_id, payload):
        result = train(client_id, payload)
        traffic.down.append(Sent("train", [client_id], payload.round, payload.arrays, payload.extras))
        traffic.updates.append(result[0])
        return result

    def recording_score(weights, client_ids):  # each client scored as by a node of its own
        rows = score_rows(weights, client_ids)
        traffic.down += [Sent("evaluate", [c], max(traffic.states), weights) for c in client_ids]
        traffic.replies += [([row["client"]], [row]) for row in rows]
        return rows

    clients.train, clients.score_rows = recording_train, recording_score
    run_rounds(federation, traffic)
    traffic.kept = {c: federation.clients.store.peek(c) for c in range(cfg.federation.clients)}
    return federation, traffic


def flower_traffic(cfg, loopback_grid) -> tuple[Federation, Traffic]:
    """The ServerApp's federation and the real ClientApp, through Flower's wire format."""
    grid = loopback_grid(client_app, {node: {"partition-id": held} for node, held in NODES.items()})
    federation = Federation.build(cfg, clients=lambda server: FlowerClients.on_grid(server, grid))
    traffic = Traffic()
    run_rounds(federation, traffic)
    for node, message, reply in grid.delivered:
        content, kind = message.content, message.metadata.message_type
        assert not reply.has_error(), reply.error.reason
        # every array of the message, whichever record holds it: "arrays" apart, the rest as extras
        extras = {name: array for key, record in content.array_records.items() if key != "arrays"
                  for name, array in decode_arrays(record).items()}
        if kind == "train":
            payload, client_id = decode_payload(content)
            traffic.down.append(Sent("train", [client_id], payload.round, payload.arrays, extras))
            traffic.updates.append(decode_update(reply.content))
        elif kind == "evaluate":
            weights, client_ids = decode_evaluate(content)
            traffic.down.append(Sent("evaluate", client_ids, max(traffic.states), weights, extras))
            traffic.replies.append((client_ids, decode_rows(reply.content)))
        else:  # the query: which partitions a node holds; no arrays either way
            assert kind == "query" and not content.array_records and not reply.content.array_records
    for node, held in NODES.items():
        state = grid.contexts[node].state
        for client_id in map(int, held.split(",")):
            record = state.array_records.get(state_key(client_id))
            traffic.kept[client_id] = {} if record is None else {k: torch.from_numpy(a.numpy()) for k, a in record.items()}
    return federation, traffic


def declared_helpers(state: ServerState, client_id: int) -> set[tuple]:
    """The contents of the helper models the server chose for `client_id` (FedMatch):
    the one place another client's arrays may travel to it."""
    helpers = state.extras.get(f"helpers/{client_id}")
    if helpers is None:
        return set()
    return set().union(*(fingerprints({k: v for k, v in state.extras.items() if k.startswith(f"snapshot/{h}/")})
                         for h in helpers.tolist()))


def own_layers(state: ServerState, client_id: int) -> set[tuple]:
    """The contents of the layers the server keeps for `client_id` (FedMA: its own
    later layers, inputs moved to the matched units), which go back to it alone."""
    return fingerprints({k: v for k, v in state.extras.items() if k.startswith(f"client/{client_id}/")})


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["inprocess", "flower"])
@pytest.mark.parametrize("algorithm", registered_algorithms())
def test_a_node_receives_only_what_its_clients_need_and_sends_back_only_updates_and_scores(
        tiny_recipe, over_flower_wire, loopback_grid, algorithm, backend):
    cfg = load_recipe(tiny_recipe, [f"algorithm.name={algorithm}", *ALGORITHMS.get(algorithm).smoke,
                                    *FOR_LOCALITY.get(algorithm, []),
                                    "federation.clients_per_round=6", "train.local_steps=1"])
    federation, traffic = (inprocess_traffic(cfg) if backend == "inprocess" else flower_traffic(cfg, loopback_grid))
    learner = federation.trainer.learner
    shared = {n: a.shape for n, a in learner.arrays(federation.trainer.shared_names).items()}
    model_names = set(learner.model.state_dict())
    clients = range(cfg.federation.clients)
    assert [s.kind for s in traffic.down].count("train") == len(traffic.updates) == 12

    # -- down: names. The payload's arrays are the model's shared arrays; an evaluation, the global model.
    for sent in traffic.down:
        names = set(sent.arrays) | set(sent.extras)
        private = set().union(*(s.extras for s in traffic.states.values()))
        assert not names & private, f"server-private arrays sent to {sent.clients}"
        if sent.kind == "train":
            if algorithm == "fedma":  # the layers to train as arrays, the matched (frozen) ones as extras
                assert set(sent.arrays) | set(sent.extras) == set(shared) and not set(sent.arrays) & set(sent.extras)
                continue
            assert set(sent.arrays) == set(shared)
            for name in sent.extras:  # FedMatch's helpers: whole models, named helper<j>/<state_dict name>
                match = re.fullmatch(r"helper\d+/(.+)", name)
                assert algorithm == "fedmatch" and match and match.group(1) in model_names, name
        else:
            assert set(sent.arrays) == model_names and not sent.extras
    if algorithm == "fedmatch":
        assert any(sent.extras for sent in traffic.down if sent.round == 2), "no helpers travelled"

    # -- down: contents. Nothing private to the server or to another client, beyond the declared helpers.
    # public: what every node is sent alike, each round's shared arrays and global model
    public = set().union(*(fingerprints({k: v for k, v in s.params.items() if k in shared}) for s in traffic.states.values()),
                         *(fingerprints(federation.algorithm.global_weights(s)) for s in traffic.states.values()),
                         *(fingerprints(s.arrays) for s in traffic.down if s.kind == "evaluate"))
    server_private = set().union(*(fingerprints({k: v for k, v in s.params.items() if k not in shared} | s.extras)
                                   for s in traffic.states.values()))
    own = {c: set() for c in clients}  # what belongs to each client: what it sent up and what it keeps
    for update in traffic.updates:
        own[update.client_id] |= fingerprints(update.arrays)
    for client_id, kept in traffic.kept.items():
        own[client_id] |= fingerprints(kept)
    for sent in traffic.down:
        others = set().union(*(own[c] for c in clients if c not in sent.clients))
        allowed = set()
        if sent.kind == "train":
            state = traffic.states[sent.round]
            allowed = declared_helpers(state, sent.clients[0]) | own_layers(state, sent.clients[0])
        leaked = (fingerprints(sent.arrays | sent.extras) & (server_private | others)) - public - allowed
        assert not leaked, f"{sent.kind} message to clients {sent.clients} in round {sent.round} carries private arrays"

    # -- up: updates hold the model's shared arrays (or FedMatch's sparse deltas of them) and scalar metrics,
    # at the shapes they were sent (FedMA's matched layers grow from round to round)
    sent_to = [sent for sent in traffic.down if sent.kind == "train"]
    for update, sent in zip(traffic.updates, sent_to, strict=True):
        assert sent.clients == [update.client_id]
        assert {f.name for f in dataclasses.fields(update)} == {"client_id", "arrays", "num_examples", "metrics"}
        assert isinstance(update.num_examples, int) and isinstance(update.client_id, int)
        for name, value in update.metrics.items():
            assert isinstance(value, (int, float)) and not isinstance(value, bool), (name, value)
        for name, array in update.arrays.items():
            base = name.rsplit("/", 1)[0] if name.endswith(("/index", "/value")) else name
            assert base in shared, f"{algorithm}: {name!r} is not one of the model's shared arrays"
            # a shared array is a state_dict entry, FedMatch's sigma/psi decomposition of one, or
            # a self-supervised learner's projection or prediction head (fedaffect)
            assert base in model_names or base.startswith(HEADS) or base.split("/", 1)[1] in model_names
            if base == name:
                assert array.shape == sent.arrays[name].shape
            else:  # a sparse delta: at most one entry per weight of that array
                assert array.dim() == 1 and len(array) <= torch.Size(shared[base]).numel()
        # no more numbers than the model holds (a sparse delta: an index and a value per entry)
        assert sum(a.numel() for a in update.arrays.values()) <= 2 * sum(torch.Size(s).numel() for s in shared.values())
        wire = over_flower_wire(encode_update(update))  # exactly this crosses Flower's wire, nothing beside it
        assert set(wire) == {"arrays", "metrics", "meta"}

    # -- up: one row of scalar scores per client asked about, nothing else
    for asked, rows in traffic.replies:
        assert sorted(row["client"] for row in rows) == sorted(asked)
        for row in rows:
            assert set(row) == set(ROW_KEYS) and all(isinstance(v, (int, float, str)) for v in row.values())

    # -- what is counted: every message's arrays, train and evaluate
    assert traffic.bytes_down == sum(array_bytes(s.arrays) + array_bytes(s.extras) for s in traffic.down)
    assert traffic.bytes_up == sum(u.num_bytes for u in traffic.updates) > 0
