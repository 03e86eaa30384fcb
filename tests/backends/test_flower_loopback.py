"""A real loopback deployment: flower-superlink and two flower-supernode processes on
127.0.0.1 (reading their own image folders in the FedAvg run), runs submitted with
`flwr run`, nothing left running afterwards."""

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


def run_loopback(tiny_recipe, tmp_path, overrides, after_start=None, timeout=240, data_paths=None):
    started = []

    def record(loop, supernodes):
        started.extend(loop.processes)
        if after_start:
            after_start(loop, supernodes)

    try:
        return flower_loopback.run(str(tiny_recipe), overrides, nodes=2, timeout=timeout,
                                   workdir=tmp_path / "loopback", after_start=record, data_paths=data_paths)
    finally:
        assert started, "the run was never submitted"
        assert not [p.pid for p in started if p.poll() is None or group_alive(p.pid)], "processes left behind"


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["fedavg", "fixmatch"])
def test_two_rounds_on_a_loopback_deployment(tiny_recipe, tmp_path, write_faces, algorithm):
    overrides, data_paths = TWO_CLIENTS + [f"algorithm.name={algorithm}", f"name={algorithm}"], None
    if algorithm == "fedavg":  # each node reads its own image folder; the server tests on its own
        for seed, folder in enumerate(("server", "node0", "node1")):
            write_faces(tmp_path / folder, count=60, seed=seed, size=28, channels=1)
        overrides += ["data.source=folder", f"data.path={tmp_path / 'server'}", "data.partition.scheme=iid"]
        data_paths = [tmp_path / "node0", tmp_path / "node1"]
    run_dir = run_loopback(tiny_recipe, tmp_path, overrides, data_paths=data_paths)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["algorithm"] == algorithm and summary["rounds"] == 2
    assert 0.0 <= summary["global_acc"] <= 1.0 and summary["dropped_clients"] == 0
    assert 0.0 <= summary["client_acc_mean"] <= 1.0  # scored by the nodes, on their own local test splits
    assert [json.loads(line)["round"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2]


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
# the data) takes tens of seconds on a busy 2-core machine
KILLED = TWO_CLIENTS + ["federation.flower.round_timeout=60"]


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
    with pytest.raises(flower_loopback.RunFailed, match=r"federation.min_clients: round 2 got 1 usable updates of 2 sampled clients.*client 0: (it did not answer|its node replied with an error: .*Node Unavailable)"):
        run_loopback(tiny_recipe, tmp_path, KILLED + ["federation.min_clients=2", "name=stopped"],
                     after_start=kill_first_node_after_round_one(tmp_path / "runs" / "stopped"))
