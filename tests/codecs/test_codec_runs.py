"""Codecs in whole runs: the bytes counted are the encoded ones, a hostile encoding
is dropped and counted, error feedback resumes bit-identically, recipe mistakes
name their key, and the Flower simulation ends where the in-process run does."""

import json
import math
from dataclasses import dataclass, fields, replace

import pytest
import torch

from fedssl.backends.flower.server import check_resumable as check_flower_resumable
from fedssl.config.load import load_recipe
from fedssl.engine.stages import Traffic, check, draw, receive
from fedssl.errors import UserError
from fedssl.engine.checkpoint import load_checkpoint
from fedssl.inprocess.clients import InProcessClients
from fedssl.engine.federation import Federation, in_process
from fedssl.codecs.links import RESIDUAL
from fedssl.engine.run import run_federation

FAST = ["train.local_steps=2"]
TOPK = "federation.uplink.codecs=[{name: topk, fraction: 0.05}]"


def metrics_of(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_bytes_up_and_down_are_the_encoded_bytes(tiny_recipe, tmp_path):
    cfg = load_recipe(tiny_recipe, [*FAST, "federation.rounds=1", "federation.uplink.codecs=[{name: quantize, bits: 2}]",
                                    "federation.downlink.codecs=[{name: quantize, bits: 8}]"])
    run_federation(cfg, tmp_path / "run")
    shapes = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["server_state"]["params"]
    up = sum(math.ceil(v.numel() / 4) + 8 for v in shapes.values())  # 4 levels per byte + lo, hi as float32
    down = sum(v.numel() + 8 for v in shapes.values())
    dense = sum(v.numel() * 4 for v in shapes.values())
    [m] = metrics_of(tmp_path / "run")
    assert m["bytes_up"] == 3 * up  # 3 clients per round
    assert m["bytes_down"] == 3 * down + 6 * dense  # training payloads encoded; the evaluation sends the model whole


@dataclass
class Tampering(InProcessClients):
    """In-process clients of which client `victim`'s encoded update is rewritten by `tamper`."""

    tamper: object = None
    victim: int = -1

    def fit(self, round_index, payloads):
        for client_id, update, problem in super().fit(round_index, payloads):
            if client_id == self.victim:
                update = replace(update, arrays=self.tamper(dict(update.arrays)))
            yield client_id, update, problem


def index_out_of_range(arrays):
    arrays["fc.weight/0.index"] = arrays["fc.weight/0.index"] + 10**6
    return arrays


def wrong_bits(arrays):
    arrays["fc.weight/0.index"] = arrays["fc.weight/0.index"].to(torch.int16)
    return arrays


def wrong_shape(arrays):
    arrays["fc.weight/values"] = torch.zeros(3)
    return arrays


@pytest.mark.parametrize("tamper, why", [(index_out_of_range, "index out of range"), (wrong_bits, "is int16"),
                                         (wrong_shape, "expected float32")])
def test_a_hostile_encoded_update_is_dropped_and_counted(tiny_recipe, tmp_path, caplog, tamper, why):
    cfg = load_recipe(tiny_recipe, [*FAST, "federation.rounds=1", TOPK])

    def clients(federation):
        built = in_process(federation)
        victim = sorted(draw(federation, 1, 0, set()))[0]
        init = {field.name: getattr(built, field.name) for field in fields(built) if field.init}  # not cached properties
        return Tampering(**init, tamper=tamper, victim=victim)

    federation = Federation.build(cfg, clients=clients)
    state, metrics = federation.fit_round(1, federation.initial_state())
    assert metrics["dropped_clients"] == 1 and metrics["clients"] == 2
    assert f"client {federation.clients.victim}: its encoded update is malformed" in caplog.text and why in caplog.text
    assert all(bool(torch.isfinite(v).all()) for v in state.params.values() if v.is_floating_point())


@pytest.mark.slow
def test_error_feedback_resumes_bit_identically(tiny_recipe, tmp_path):
    links = [*FAST, TOPK, "federation.downlink.codecs=[{name: hadamard}, {name: quantize, bits: 8}]"]
    run_federation(load_recipe(tiny_recipe, [*links, "federation.rounds=3"]), tmp_path / "whole")
    run_federation(load_recipe(tiny_recipe, [*links, "federation.rounds=2"]), tmp_path / "killed")
    run_federation(load_recipe(tiny_recipe, [*links, "federation.rounds=3"]), tmp_path / "killed", resume=True)
    whole, resumed = load_checkpoint(tmp_path / "whole" / "checkpoint.pt"), load_checkpoint(tmp_path / "killed" / "checkpoint.pt")
    for name, value in whole["server_state"]["params"].items():
        assert torch.equal(value, resumed["server_state"]["params"][name]), name
    states = whole["client_states"]
    assert states and all(any(k.startswith(RESIDUAL) for k in state) for state in states.values())
    assert states.keys() == resumed["client_states"].keys()
    for client, state in states.items():
        assert all(torch.equal(v, resumed["client_states"][client][k]) for k, v in state.items())
    assert [m["bytes_up"] for m in metrics_of(tmp_path / "whole")] == [m["bytes_up"] for m in metrics_of(tmp_path / "killed")]


def test_a_flower_run_with_error_feedback_refuses_to_resume(tiny_recipe):
    with pytest.raises(UserError, match="cannot resume: with error feedback"):
        check_flower_resumable(load_recipe(tiny_recipe, [TOPK]), resume=True)
    check_flower_resumable(load_recipe(tiny_recipe, ["federation.uplink.codecs=[{name: topk, error_feedback: false}]"]),
                           resume=True)


@pytest.mark.parametrize("overrides, message", [
    (["federation.uplink.codecs=[{name: quantize, bitz: 2}]"], r"unknown key 'bitz' in an entry of federation.uplink.codecs .*\(did you mean 'bits'\?\)"),
    (["federation.uplink.codecs=[{name: quantise}]"], r"federation.uplink.codecs\[0\].name: unknown codec 'quantise' \(did you mean 'quantize'\?\)"),
    (["federation.uplink.codecs=[{name: quantize, fraction: 0.1}]"], r"federation.uplink.codecs\[0\].fraction: codec quantize takes bits"),
    (["federation.uplink.codecs=[{name: quantize, bits: 3}]"], r"federation.uplink.codecs\[0\].bits: must be one of 1, 2, 4, 8"),
    (["federation.uplink.codecs=[{name: topk, fraction: 0}]"], r"federation.uplink.codecs\[0\].fraction: must be in \(0, 1\]"),
    (["federation.uplink.codecs=[{name: quantize}, {name: topk}]"], r"federation.uplink.codecs\[1\].name: quantize is final"),
    (["federation.uplink.codecs=[{name: hadamard}, {name: low_rank}]"], r"federation.uplink.codecs\[1\].name: low_rank .* must come first"),
    (["federation.downlink.codecs=[{name: topk}]"], r"federation.downlink.codecs: error feedback"),
    (["federation.uplink.channel.loss=1.5"], r"federation.uplink.channel.loss: must be a probability"),
    (["federation.uplink.channel.strategy=average"], r"federation.uplink.channel.strategy: unknown value 'average'"),
    (["federation.uplink.channel.loss=0.1", "federation.uplink.channel.strategy=mean", "federation.robust.aggregator=median"],
     r"federation.uplink.channel.strategy: mean averages each coordinate"),
])
def test_recipe_mistakes_name_their_key(tiny_recipe, overrides, message):
    with pytest.raises(UserError, match=message):
        load_recipe(tiny_recipe, overrides)


def test_algorithms_that_do_not_average_dense_updates_are_refused(tiny_recipe):
    cfg = load_recipe(tiny_recipe, ["algorithm.name=fedmatch", TOPK])
    with pytest.raises(UserError, match="federation.uplink.codecs: algorithm.name=fedmatch does not average dense"):
        Federation.build(cfg)


# Not marked slow: the fast tier's one Flower simulation, codecs and channel on both backends
def test_codecs_and_a_lossy_channel_on_the_flower_simulation_end_as_in_process(tiny_recipe):
    from fedssl.launch import launch

    overrides = ["federation.rounds=2", *FAST, TOPK, "federation.downlink.codecs=[{name: quantize, bits: 8}]",
                 "federation.uplink.channel.loss=0.2", "federation.uplink.channel.strategy=fill",
                 "federation.flower.connect_timeout=600"]  # Ray's start on a busy 2-core machine
    _, flower_dir, flower = launch(str(tiny_recipe), [*overrides, "name=flower", "federation.backend=flower"])
    _, local_dir, local = launch(str(tiny_recipe), [*overrides, "name=local"])
    for key in ("global_acc", "client_acc_mean", "bytes_up", "bytes_down", "dropped_clients"):
        assert flower[key] == local[key], key
    got = load_checkpoint(flower_dir / "checkpoint.pt")["server_state"]["params"]
    want = load_checkpoint(local_dir / "checkpoint.pt")["server_state"]["params"]
    for name in want:  # float sums may differ in the last bits with another thread count
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)
    flower_rounds, local_rounds = metrics_of(flower_dir), metrics_of(local_dir)
    for key in ("packets_sent", "packets_lost", "coordinate_participation_mean"):
        assert [m[key] for m in flower_rounds] == [m[key] for m in local_rounds], key
    assert sum(m["packets_lost"] for m in local_rounds) > 0


def test_a_flower_node_decodes_its_payload_and_encodes_its_update_as_in_process(tiny_recipe, over_flower_wire):
    """The node side of the Flower backend without the simulation engine: a train
    message through Flower's wire to the node's handler and back, as the in-process
    clients train the same client; the node holds the residual until the server accepts."""
    from flwr.app import ConfigRecord, Context, RecordDict

    from fedssl.backends.flower.client import DRAW, RUN, train_client
    from fedssl.backends.flower.codec import decode_update, encode_payload
    from fedssl.backends.flower.node import commit_state, load_state
    from fedssl.config.load import to_yaml

    cfg = load_recipe(tiny_recipe, [*FAST, TOPK, "federation.downlink.codecs=[{name: quantize, bits: 8}]"])
    server = Federation.build(cfg)
    payload, sent = server.links.send_payload(server.algorithm.payload(1, server.initial_state(), 2), 2)
    content = encode_payload(payload, 2)
    content[RUN] = ConfigRecord({"recipe": to_yaml(cfg), "classes": list(server.data.class_names)})
    content[DRAW] = ConfigRecord({"draw": "1", "accepted": ""})
    context = Context(run_id=1, node_id=1, node_config={"partition-id": "2"}, state=RecordDict(), run_config={})
    on_node = decode_update(over_flower_wire(train_client(over_flower_wire(content), context)))

    local, kept = server.clients.train(2, payload)
    assert on_node.num_bytes == local.num_bytes < sum(v.numel() * 4 for v in sent.values()) / 5
    assert on_node.arrays.keys() == local.arrays.keys()
    for name, value in local.arrays.items():  # the same encoding (float sums may differ in the last bits)
        torch.testing.assert_close(on_node.arrays[name], value, rtol=1e-5, atol=1e-6)
    received = receive(server, 1, 2, on_node, replace(payload, arrays=sent), Traffic())
    assert received.problem is None and check(server, 2, received.update, replace(payload, arrays=sent)) is None
    # the residual is held on the node, and becomes the client's state once the server accepts draw 1
    assert load_state(context, 2) == {}
    commit_state(context, 2, "1")
    residuals = load_state(context, 2)
    assert residuals.keys() == {k for k in kept if k.startswith(RESIDUAL)} and residuals
