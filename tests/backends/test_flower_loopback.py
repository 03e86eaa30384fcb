"""A real loopback deployment: flower-superlink and two flower-supernode processes on
127.0.0.1, runs submitted with `flwr run`, nothing left running afterwards."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import flower_loopback  # noqa: E402

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


def run_loopback(tiny_recipe, tmp_path, overrides, after_start=None, timeout=240):
    started = []

    def record(loop, supernodes):
        started.extend(loop.processes)
        if after_start:
            after_start(loop, supernodes)

    try:
        return flower_loopback.run(str(tiny_recipe), overrides, nodes=2, timeout=timeout,
                                   workdir=tmp_path / "loopback", after_start=record)
    finally:
        assert started, "the run was never submitted"
        assert not [p.pid for p in started if p.poll() is None or group_alive(p.pid)], "processes left behind"


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["fedavg", "fixmatch"])
def test_two_rounds_on_a_loopback_deployment(tiny_recipe, tmp_path, algorithm):
    run_dir = run_loopback(tiny_recipe, tmp_path, TWO_CLIENTS + [f"algorithm.name={algorithm}", f"name={algorithm}"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["algorithm"] == algorithm and summary["rounds"] == 2
    assert 0.0 <= summary["global_acc"] <= 1.0 and summary["dropped_clients"] == 0
    assert [json.loads(line)["round"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def kill_first_node(loop, supernodes):
    loop.stop(supernodes[0])


@pytest.mark.slow
def test_a_killed_supernode_is_dropped_and_the_run_finishes(tiny_recipe, tmp_path):
    run_dir = run_loopback(tiny_recipe, tmp_path, TWO_CLIENTS + ["federation.flower.round_timeout=15", "name=killed"],
                           after_start=kill_first_node)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["dropped_clients"] == 2  # client 0, once in each round


@pytest.mark.slow
def test_a_killed_supernode_below_min_clients_stops_with_a_clear_message(tiny_recipe, tmp_path):
    with pytest.raises(flower_loopback.RunFailed, match=r"federation.min_clients: round 1 got 1 usable updates"):
        run_loopback(tiny_recipe, tmp_path, TWO_CLIENTS + ["federation.flower.round_timeout=15", "federation.min_clients=2",
                                                          "name=stopped"], after_start=kill_first_node)
