"""A real loopback deployment: flower-superlink and two flower-supernode processes on
127.0.0.1, runs submitted with `flwr run`, nothing left running afterwards. The FixMatch
run is encrypted and authenticated (TLS, registered node keys; its nodes read their own
image folders) and refuses SuperNodes without a registered key; the killed-node runs
(FedAvg, the recipe's algorithm) keep insecure mode covered.

Each message a node serves starts a fresh ClientApp process (torch, Lightning and
fedssl imported anew), tens of seconds on a busy 2-core machine: a run here sends no
more messages than its assertions need."""

import json
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import flower_loopback  # noqa: E402

from fedssl.backends.flower.server import SERVER_ERROR  # noqa: E402

TWO_CLIENTS = ["federation.rounds=2", "federation.clients=2", "federation.clients_per_round=2"]


def group_alive(pgid: int) -> bool:
    """Whether a process of group `pgid` still runs. Zombies do not count: an app
    whose parent was killed waits, dead, for PID 1 to reap it."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended while we looked
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


def run_loopback(tiny_recipe, tmp_path, overrides, after_start=None, timeout=240, data_paths=None, secure=False):
    loops = []

    def record(loop, supernodes):
        loops.append(loop)
        if after_start:
            after_start(loop, supernodes)

    try:
        return flower_loopback.run(str(tiny_recipe), overrides, nodes=2, timeout=timeout, workdir=tmp_path / "loopback",
                                   after_start=record, data_paths=data_paths, secure=secure)
    finally:
        assert loops, "the run was never submitted"
        started = loops[0].processes  # also those after_start started
        assert not [p.pid for p in started if p.poll() is None or group_alive(p.pid)], "processes left behind"


def assert_two_rounds(run_dir: Path, algorithm: str) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["algorithm"] == algorithm and summary["rounds"] == 2
    assert 0.0 <= summary["global_acc"] <= 1.0 and summary["dropped_clients"] == 0
    assert 0.0 <= summary["client_acc_mean"] <= 1.0  # scored by the nodes, on their own local test splits
    assert 0.0 <= summary["personal_f1_macro"] <= 1.0 and 0.0 <= summary["global_f1_macro"] <= 1.0
    assert [json.loads(line)["round"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2]


# what Flower 1.42's SuperLink answers a SuperNode it refuses, as the node logs it before exiting
NOT_REGISTERED = "SuperNode authentication is enabled. All SuperNodes must be registered via the CLI."
UNKNOWN_KEY = "Failed to activate SuperNode."


@pytest.mark.slow
def test_fixmatch_over_tls_with_authenticated_nodes_refuses_unregistered_ones(tiny_recipe, tmp_path, write_faces):
    """Also the deployment's one clean FixMatch run: two rounds, each evaluated on the
    nodes (one deployment serves both checks; each costs minutes on its own)."""
    for seed, folder in enumerate(("server", "node0", "node1")):  # each node reads its own image folder
        write_faces(tmp_path / folder, count=60, seed=seed, size=28, channels=1)
    overrides = TWO_CLIENTS + ["algorithm.name=fixmatch", "name=fixmatch", "data.source=folder",
                               f"data.path={tmp_path / 'server'}", "data.partition.scheme=iid"]
    refused = {}

    def start_intruders(loop, supernodes):
        """Two SuperNodes that trust the CA and claim client 0, but whose key nobody
        registered: one without a key (Flower then makes one and asks to self-register),
        one with a key pair of its own. Both must be turned away at once."""
        stranger, _ = flower_loopback.flower_certs.node_key_pair(tmp_path, "stranger")
        intruders = {"keyless": loop.start_supernode("keyless", 'partition-id="0"'),
                     "stranger": loop.start_supernode("stranger", 'partition-id="0"', auth_key=stranger)}
        deadline = time.monotonic() + 90  # they take seconds; a node let in would wait for work forever
        while any(p.poll() is None for p in intruders.values()) and time.monotonic() < deadline:
            time.sleep(0.2)
        refused.update({name: (p.poll(), (loop.workdir / f"{name}.log").read_text()) for name, p in intruders.items()})

    run_dir = run_loopback(tiny_recipe, tmp_path, overrides, after_start=start_intruders, secure=True,
                           data_paths=[tmp_path / "node0", tmp_path / "node1"])
    assert_two_rounds(run_dir, "fixmatch")  # the registered nodes served both clients
    for name, reason in (("keyless", NOT_REGISTERED), ("stranger", UNKNOWN_KEY)):
        code, log = refused[name]
        assert code not in (None, 0), f"SuperNode {name}, whose key nobody registered, was let in:\n{log}"
        assert reason in log, log
    # the nodes that did take part reached the SuperLink over TLS, verified against the CA
    assert "running on https://127.0.0.1" in (tmp_path / "loopback" / "superlink.log").read_text()


def kill_first_node_after_round_one(run_dir: Path):
    """Stop the first SuperNode once round 1 is logged: mid-run, after its partitions
    were discovered (bounded: the test fails rather than waits forever)."""
    def kill(loop, supernodes):
        deadline = time.monotonic() + 180
        metrics = run_dir / "metrics.jsonl"
        while not (metrics.is_file() and metrics.read_text().strip()) and not (run_dir / SERVER_ERROR).is_file():
            assert time.monotonic() < deadline, "round 1 never finished"
            time.sleep(0.2)
        loop.stop(supernodes[0])
    return kill


# 60 s: a cold node's first round (a fresh ClientApp process imports torch and builds
# the data) takes tens of seconds on a busy 2-core machine. The global model is scored
# once, after round 2: what these tests check is the killed node's update and its
# evaluation row in round 2, and an evaluation after round 1 would be one more cold
# ClientApp per node before the kill.
KILLED = TWO_CLIENTS + ["federation.flower.round_timeout=60", "federation.eval_every=2"]


@pytest.mark.slow
def test_a_killed_supernode_is_dropped_and_the_run_finishes(tiny_recipe, tmp_path):
    run_dir = run_loopback(tiny_recipe, tmp_path, KILLED + ["name=killed"],
                           after_start=kill_first_node_after_round_one(tmp_path / "runs" / "killed"))
    summary = json.loads((run_dir / "summary.json").read_text())
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # client 0, gone: its update and its evaluation row
    assert rounds[0]["dropped_clients"] == 0 and rounds[-1]["dropped_clients"] == 2
    assert summary["rounds"] == 2 and summary["dropped_clients"] == 2


@pytest.mark.slow
def test_a_killed_supernode_below_min_clients_stops_with_a_clear_message(tiny_recipe, tmp_path):
    with pytest.raises(flower_loopback.RunFailed, match=r"federation.robust.min_clients: round 2 got 1 usable updates of 2 sampled clients.*client 0: (it did not answer|its node replied with an error: .*Node Unavailable)"):
        run_loopback(tiny_recipe, tmp_path, KILLED + ["federation.robust.min_clients=2", "name=stopped"],
                     after_start=kill_first_node_after_round_one(tmp_path / "runs" / "stopped"))
