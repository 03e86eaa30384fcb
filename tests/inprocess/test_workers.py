"""Clients trained by worker processes (`federation.execution.workers`): the same run as in
process, bit for bit, whatever the algorithm; dead workers, errors and interrupts
leave no process behind."""

import json
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedssl.algorithms.base import ALGORITHMS
from fedssl.algorithms.fedavg import FedAvg
from fedssl.config.load import load_recipe
from fedssl.errors import UserError
from fedssl.engine.checkpoint import load_checkpoint
from fedssl.engine.federation import Federation
from fedssl.engine.run import run_federation
from fedssl.inprocess.workers import MIN_AUTO_STEPS, worker_count
from fedssl.learners.supervised import SupervisedLearner
from fedssl.tracking.run_logger import read_metrics

# Both runs on one torch thread: a worker trains on one, and float reductions of a
# conv net's backward differ with the thread count (docs/running.md).
assert torch.get_num_threads() == 1, "tests/conftest.py pins one torch thread"


def run(recipe: Path, directory: Path, *overrides: str, resume: bool = False) -> dict:
    run_federation(load_recipe(recipe, list(overrides)), directory, resume=resume)
    assert not multiprocessing.active_children(), "the run left worker processes behind"
    return load_checkpoint(directory / "checkpoint.pt")


def assert_same_run(a: Path, b: Path) -> None:
    """The same server state, client states and metrics (all but the wall-clock time)."""
    first, second = load_checkpoint(a / "checkpoint.pt"), load_checkpoint(b / "checkpoint.pt")
    for part in ("params", "momentum", "extras"):
        assert (first["server_state"][part] or {}).keys() == (second["server_state"][part] or {}).keys()
        for name, array in (first["server_state"][part] or {}).items():
            assert torch.equal(second["server_state"][part][name], array), (part, name)
    assert first["client_states"].keys() == second["client_states"].keys()
    for client, state in first["client_states"].items():
        assert state.keys() == second["client_states"][client].keys()
        assert all(torch.equal(second["client_states"][client][k], v) for k, v in state.items()), client
    timeless = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert timeless(read_metrics(a / "metrics.jsonl")) == timeless(read_metrics(b / "metrics.jsonl"))


@pytest.mark.parametrize("overrides", [
    ["federation.robust.aggregator=median", "federation.clients_per_round=4"],  # FedAvg, robust aggregation
    ["algorithm.name=fixmatch"],  # semi-supervised: weak and strong augmentation
    ["algorithm.name=ditto"],  # a personal model in the client state store
    ["algorithm.name=fedmatch", "algorithm.fedmatch.helpers=1"],  # helper models in the payload (round 2)
    ["privacy.mechanism=central", "privacy.noise_multiplier=0.5"],  # DP-FedAvg, Poisson sampling
], ids=["fedavg-median", "fixmatch", "ditto", "fedmatch", "dp"])
@pytest.mark.slow
def test_workers_train_exactly_as_the_process_itself(tiny_recipe, tmp_path, overrides):
    rounds = ["federation.rounds=2", *overrides]
    run(tiny_recipe, tmp_path / "sequential", *rounds, "federation.execution.workers=0")
    run(tiny_recipe, tmp_path / "workers", *rounds, "federation.execution.workers=2")
    assert_same_run(tmp_path / "sequential", tmp_path / "workers")


@pytest.mark.slow
def test_a_run_with_workers_resumes_to_the_same_run(tiny_recipe, tmp_path):
    overrides = ["algorithm.name=fedper", "federation.execution.workers=2"]
    run(tiny_recipe, tmp_path / "whole", *overrides)
    run(tiny_recipe, tmp_path / "killed", *overrides, "federation.rounds=2")  # as if killed after round 2
    run(tiny_recipe, tmp_path / "killed", *overrides, resume=True)
    assert_same_run(tmp_path / "whole", tmp_path / "killed")


class DyingLearner(SupervisedLearner):
    """A FedAvg learner whose process dies training client 5 (no exception, no reply)."""

    def start_round(self, payload, context):
        super().start_round(payload, context)
        if context.client_id == 5:
            os._exit(3)


class Dying(FedAvg):
    def make_learner(self, model):
        return DyingLearner(model, self.cfg.train)


@pytest.fixture
def dying(monkeypatch):
    monkeypatch.setitem(ALGORITHMS._entries, "dying", Dying)


def test_a_dead_worker_stands_for_its_client_and_the_round_goes_on(tiny_recipe, tmp_path, dying, caplog):
    overrides = ["algorithm.name=dying", "federation.clients_per_round=6", "federation.rounds=2", "federation.execution.workers=2"]
    with caplog.at_level(logging.WARNING):
        run(tiny_recipe, tmp_path / "run", *overrides)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["dropped_clients"] for r in rows] == [1, 1] and [r["clients"] for r in rows] == [5, 5]
    assert any("dropped the update of client 5: it raised WorkerDied: its worker process died (exit code 3)"
               in r.getMessage() for r in caplog.records)


def test_a_stopped_run_leaves_no_worker_behind(tiny_recipe, tmp_path, dying):
    overrides = ["algorithm.name=dying", "federation.clients_per_round=6", "federation.robust.min_clients=6",
                 "federation.execution.workers=2"]
    with pytest.raises(UserError, match="federation.robust.min_clients: round 1 got 5 usable updates"):
        run(tiny_recipe, tmp_path / "run", *overrides)
    assert not multiprocessing.active_children()


def children(pid: int) -> set[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return {int(p) for p in path.read_text().split()} if path.exists() else set()


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return status.rsplit(")", 1)[1].split()[0] != "Z"


def as_from_a_terminal() -> None:
    """Ctrl-C as a terminal delivers it: an ignored SIGINT is inherited across exec, and
    the suite's own process may ignore it (Ray and Flower set signal handlers)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads a process's children from /proc (Linux)")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "killed"])
def test_workers_end_with_an_interrupted_or_killed_run(tiny_recipe, sig):
    process = subprocess.Popen([sys.executable, "-m", "fedssl.cli", "run", str(tiny_recipe), "federation.rounds=500",
                                "federation.execution.workers=2", "federation.clients_per_round=6"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               preexec_fn=as_from_a_terminal)
    deadline = time.monotonic() + 120
    while len(children(process.pid)) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = children(process.pid)
    assert len(workers) >= 2, process.stderr.read() if process.poll() is not None else "no workers started"
    process.send_signal(sig)
    process.wait(timeout=60)
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in workers)
    if sig == signal.SIGINT:
        assert "Traceback" not in process.stderr.read()


def test_auto_uses_the_cores_only_where_a_round_is_worth_forking_for():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert worker_count("auto", cpu, clients_per_round=20, round_steps=6000, cores=2) == 2
    assert worker_count("auto", cpu, clients_per_round=3, round_steps=6000, cores=8) == 3
    assert worker_count("auto", cpu, clients_per_round=20, round_steps=MIN_AUTO_STEPS - 1, cores=2) == 0
    assert worker_count("auto", cpu, clients_per_round=20, round_steps=6000, cores=1) == 0
    assert worker_count("auto", cpu, clients_per_round=1, round_steps=6000, cores=2) == 0
    assert worker_count("auto", cuda, clients_per_round=20, round_steps=6000, cores=2) == 0
    assert worker_count("3", cpu, clients_per_round=20, round_steps=10, cores=1) == 3


@pytest.mark.parametrize("value", ["-1", "two", "1.5"])
def test_a_bad_worker_count_names_the_key(tiny_recipe, value):
    with pytest.raises(UserError, match=r"^federation.execution.workers: must be auto or a count"):
        load_recipe(tiny_recipe, [f"federation.execution.workers={value}"])


def test_workers_are_refused_with_a_cohort_trainer(tiny_recipe):
    with pytest.raises(UserError, match=r"^federation.execution.workers: 2 worker processes .* federation.execution.concurrency is vmap"):
        Federation.build(load_recipe(tiny_recipe, ["federation.execution.workers=2", "federation.execution.concurrency=vmap"]))


def test_a_worker_count_above_the_clients_per_round_is_capped_and_said_once(tiny_recipe, caplog):
    with caplog.at_level(logging.WARNING, logger="fedssl"):
        federation = Federation.build(load_recipe(tiny_recipe, ["federation.execution.workers=99"]))
    try:
        assert federation.clients.executor.pool.size == 3  # tiny: 3 clients a round
    finally:
        federation.close()
    capped = [r.getMessage() for r in caplog.records if "capped" in r.getMessage()]
    assert capped == ["federation.execution.workers: 99 worker processes capped to the 3 clients a round trains"]
