"""Trust boundaries on Flower's simulation engine, in one FedMatch run (two rounds,
six virtual nodes, one client each, every client every round).

Four nodes are rogue: they run fedssl's real ClientApp and tamper with its replies
(a x1e30 update, a claim of 1e9 examples, float64 arrays, a reply without its meta
record, an answer for another client, an extra array; evaluation rows lacking a
key, about a client the node does not serve, with an accuracy of 1.5, with a wrong
test size). Each bad reply is dropped with a warning and counted, the run completes
and the global model stays finite. Every node also records what it was sent: FedMatch
is the algorithm whose server holds other clients' models, and no node receives any
beyond the helpers the server chose for its client, nor anything of the server's own.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import ray.cloudpickle
import torch
from flwr.app import Array, ConfigRecord, Message
from flwr.clientapp import ClientApp

from fedssl.backends.flower import client as fedssl_client
from fedssl.backends.flower.simulation import simulate
from fedssl.config.load import load_recipe
from fedssl.engine.checkpoint import load_checkpoint
from fedssl.algorithms.fedmatch import FedMatch
from fedssl.engine.federation import Federation
from fedssl.tracking.run_logger import read_metrics

OVERRIDES = ["federation.rounds=2", "federation.clients_per_round=6", "data.labels.mode=client",
             "data.labels.per_class=2", "algorithm.ssl.unlabeled_ratio=2", "algorithm.name=fedmatch",
             "algorithm.fedmatch.helper_every=1", "train.local_steps=2", "train.lr=0.001", "train.momentum=0"]
# client -> round -> how its node tampers with the client's update
TRAIN_FAULTS = {1: {1: "huge", 2: "impostor"}, 2: {1: "examples", 2: "unexpected"}, 3: {1: "float64"}, 4: {1: "malformed"}}
# client -> how its node tampers with its evaluation reply, at every evaluation
EVAL_FAULTS = {1: "missing key", 2: "foreign row", 3: "accuracy", 4: "test size"}
# what the server says of each, in its warning
TRAIN_WARNINGS = {
    (1, 1): "round 1: dropped the update of client 1: it moved the weights by",
    (2, 1): "round 1: dropped the update of client 2: num_examples 1000000000 exceeds the",
    (3, 1): "round 1: dropped the update of client 3: ",  # an array (dense, or a sparse delta's values) is float64
    (4, 1): "round 1: dropped the update of client 4: its node sent a malformed reply: it lacks the 'meta' record",
    (1, 2): "round 2: dropped the update of client 1: its node answered for client 0",
    (2, 2): "round 2: dropped the update of client 2: unexpected array 'images'",
}
EVAL_WARNINGS = {1: "the row of client 1 lacks loss", 2: "a row about client 0, which it was not asked to score",
                 3: "the row of client 3: acc must be in [0, 1], got 1.5", 4: "the row of client 4 says test_samples"}
HONEST = (0, 5)


def fingerprint(array: np.ndarray) -> str | None:
    """What identifies an array's contents; None for arrays too plain to belong to
    anyone (integers, constants such as a zero-initialized psi)."""
    if array.dtype.kind != "f" or array.size < 2 or bool((array == array.flat[0]).all()):
        return None
    return f"{array.dtype}{array.shape}" + hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()


def write_record(directory: str, entry: dict) -> None:
    (Path(directory) / f"{uuid.uuid4().hex}.json").write_text(json.dumps(entry | {"time": time.time()}))


def arrays_of(content) -> dict[str, dict[str, list]]:
    """Per array record: each array's name -> [fingerprint, bytes]."""
    return {key: {name: [fingerprint(a.numpy()), len(a.numpy().tobytes())] for name, a in record.items()}
            for key, record in content.array_records.items()}


def tamper_update(content, fault: str):
    arrays, meta = content.array_records.get("arrays"), content.config_records.get("meta")
    floating = [name for name, a in arrays.items() if a.numpy().dtype.kind == "f"]
    if fault == "huge":  # finite, and far enough to turn the example-weighted mean into ~1e29
        for name in floating:
            arrays[name] = Array.from_numpy_ndarray(arrays[name].numpy() * np.float32(1e30))
    elif fault == "float64":
        for name in floating:
            arrays[name] = Array.from_numpy_ndarray(arrays[name].numpy().astype(np.float64))
    elif fault == "examples":
        meta["num_examples"] = 10**9
    elif fault == "impostor":
        meta["client_id"] = 0
    elif fault == "unexpected":
        arrays["images"] = Array.from_numpy_ndarray(np.zeros((4, 1, 28, 28), dtype=np.float32))
    elif fault == "malformed":
        del content["meta"]
    return content


def tamper_rows(content, fault: str, client_id: int):
    row = content.config_records[f"client{client_id}"]
    if fault == "missing key":
        del row["loss"]
    elif fault == "foreign row":  # its own row stays honest; it also scores client 0 perfectly
        content["client0"] = ConfigRecord(dict(row) | {"client": 0, "acc": 1.0, "personal_acc": 1.0})
    elif fault == "accuracy":
        row["acc"] = 1.5
    elif fault == "test size":
        row["test_samples"] = int(row["test_samples"]) + 100
    return content


def rogue_app(directory: str) -> ClientApp:
    """fedssl's ClientApp; its replies tampered with as TRAIN_FAULTS and EVAL_FAULTS say,
    and every message it receives recorded (with its honest reply) in `directory`."""
    app = ClientApp()

    @app.query()
    def query(message: Message, context):
        return fedssl_client.partitions(message, context)

    @app.train()
    def train(message: Message, context):
        meta = message.content.config_records["meta"]
        client_id, round_index = int(meta["client_id"]), int(meta["round"])
        reply = fedssl_client.train_client(message.content, context)
        write_record(directory, {"kind": "train", "clients": [client_id], "round": round_index,
                                 "arrays": arrays_of(message.content), "update": arrays_of(reply)})
        fault = TRAIN_FAULTS.get(client_id, {}).get(round_index)
        return Message(tamper_update(reply, fault) if fault else reply, reply_to=message)

    @app.evaluate()
    def evaluate(message: Message, context):
        reply = fedssl_client.evaluate(message, context)
        clients = [int(c) for c in message.content.config_records["meta"]["clients"]]
        write_record(directory, {"kind": "evaluate", "clients": clients, "arrays": arrays_of(message.content),
                                 "rows": [dict(row) for row in reply.content.config_records.values()]})
        fault = EVAL_FAULTS.get(clients[0])
        if fault:
            reply.content = tamper_rows(reply.content, fault, clients[0])
        return reply

    return app


class Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def rogue_run(module_tiny_recipe, tmp_path_factory):
    """The run, what the server built each round's payloads from, what every node
    recorded, and the server's warnings."""
    directory = tmp_path_factory.mktemp("received")
    cfg = load_recipe(module_tiny_recipe, OVERRIDES)
    run_dir = Path(cfg.output_dir) / "rogue"
    run_dir.mkdir(parents=True)
    states: dict = {}  # round -> the ServerState its payloads were made from
    payload = FedMatch.payload

    def recording_payload(self, round_index, state, client_id):  # on the server, in this process
        states[round_index] = state
        return payload(self, round_index, state, client_id)

    warnings, fedssl_log = Warnings(), logging.getLogger("fedssl")
    fedssl_log.addHandler(warnings)
    # Ray's workers cannot import a test module: the rogue app travels to them by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(FedMatch, "payload", recording_payload)
            summary = simulate(cfg, run_dir, client_app=rogue_app(str(directory)))
    finally:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        fedssl_log.removeHandler(warnings)
    received = sorted((json.loads(path.read_text()) for path in directory.glob("*.json")), key=lambda e: e["time"])
    return cfg, run_dir, summary, states, received, warnings.lines


@pytest.mark.slow
def test_every_rogue_reply_is_dropped_and_counted_and_the_run_completes(rogue_run):
    cfg, run_dir, summary, _, received, warnings = rogue_run

    assert summary["rounds"] == 2
    for (client_id, round_index), warning in TRAIN_WARNINGS.items():
        assert any(line.startswith(warning) for line in warnings), warning
    assert any("is float64, expected float32" in line for line in warnings if "client 3" in line)
    for client_id, problem in EVAL_WARNINGS.items():
        assert sum(f"(clients [{client_id}]): {problem}" in line for line in warnings) == 2, problem  # both evaluations
    # round 1: 4 updates and 4 evaluation rows; round 2: 2 updates and 4 rows
    assert [m["dropped_clients"] for m in read_metrics(run_dir / "metrics.jsonl")] == [8, 6]
    assert summary["dropped_clients"] == 14

    params = load_checkpoint(run_dir / "checkpoint.pt")["server_state"]["params"]
    assert all(bool(torch.isfinite(v).all()) for v in params.values() if v.is_floating_point())
    assert math.isfinite(summary["global_loss"]) and summary["global_loss"] < 10

    # The metrics are the honest rows' alone: clients 0, 2 (its own row) and 5 at the last evaluation.
    last = [e for e in received if e["kind"] == "evaluate"][-cfg.federation.clients:]
    honest_rows = {row["client"]: row for e in last for row in e["rows"]}
    kept = [honest_rows[c] for c in (0, 2, 5) if honest_rows[c]["test_samples"]]
    assert summary["client_acc_mean"] == pytest.approx(np.mean([r["acc"] for r in kept]))
    assert summary["personal_acc"] == pytest.approx(np.mean([r["personal_acc"] for r in kept]))


@pytest.mark.slow
def test_a_node_receives_only_its_clients_payload_and_the_global_model_on_the_simulation_engine(rogue_run):
    cfg, run_dir, summary, states, received, _ = rogue_run
    federation = Federation.build(cfg)
    shared, model_names = set(federation.trainer.shared_names), set(federation.model.state_dict())
    as_numpy = lambda arrays: {fingerprint(a.numpy()) for a in arrays.values()} - {None}

    public = set().union(*(as_numpy({k: v for k, v in s.params.items() if k in shared}) for s in states.values()),
                         *(as_numpy(federation.algorithm.global_weights(s)) for s in states.values()))
    server_private = set().union(*(as_numpy(s.extras) for s in states.values()))
    sent_up = {c: set() for c in range(cfg.federation.clients)}  # what each client's (honest) update held
    for entry in received:
        if entry["kind"] == "train":
            sent_up[entry["clients"][0]] |= {f for f, _ in entry["update"]["arrays"].values()} - {None}

    assert sum(e["kind"] == "train" for e in received) == 12 and sum(e["kind"] == "evaluate" for e in received) == 12
    helpers_travelled = False
    for entry in received:
        arrays, client_id = entry["arrays"], entry["clients"][0]
        names = {name for record in arrays.values() for name in record}
        assert not names & set().union(*(s.extras for s in states.values()))
        if entry["kind"] == "train":
            assert set(arrays) == {"arrays", "extras"} and set(arrays["arrays"]) == shared
            assert all(re.fullmatch(r"helper\d+/(.+)", n).group(1) in model_names for n in arrays["extras"])
            extras = states[entry["round"]].extras
            chosen = extras.get(f"helpers/{client_id}", torch.zeros(0)).tolist()
            allowed = as_numpy({k: v for k, v in extras.items() for h in chosen if k.startswith(f"snapshot/{h}/")})
            helpers_travelled |= bool(arrays["extras"])
        else:
            assert set(arrays) == {"arrays"} and set(arrays["arrays"]) == model_names
            allowed = set()
        others = set().union(*(sent_up[c] for c in sent_up if c not in entry["clients"]))
        contents = {f for record in arrays.values() for f, _ in record.values()} - {None}
        assert not (contents & (server_private | others)) - public - allowed, entry["kind"]
    assert helpers_travelled

    # bytes_down counts every message's arrays, train and evaluate
    assert summary["bytes_down"] == sum(size for e in received for record in e["arrays"].values()
                                        for _, size in record.values())
