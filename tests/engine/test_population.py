"""Large populations: rounds whose cost follows the cohort, not the population, and
memory that stays flat as more and more clients are trained."""

from __future__ import annotations

import os

import pytest
import torch

from fedssl.config.load import load_recipe
from fedssl.engine.federation import Federation

DRAW = ["data.partition.scheme=draw", "data.partition.samples_per_client=12", "train.batch_size=8"]


def resident_mb() -> float:
    """This process's resident memory now (/proc/self/statm: pages)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.slow
def test_a_population_of_100000_trains_and_scores_only_its_cohorts(tiny_recipe):
    cfg = load_recipe(tiny_recipe, [*DRAW, "federation.clients=100000", "federation.clients_per_round=3",
                                    "federation.evaluation.eval_clients=4", "federation.evaluation.holdout_clients=2"])
    federation = Federation.build(cfg)
    state, metrics = federation.fit_round(1, federation.initial_state())
    assert metrics["clients"] == 3
    evaluated, rows = federation.evaluate(state, 1)
    held_out = sorted(federation.held_out)
    assert len(rows) == 6 and sorted(r["client"] for r in rows if r["held_out"]) == held_out
    assert evaluated["client_acc_mean"] == pytest.approx(
        sum(r["acc"] for r in rows if not r["held_out"]) / 4) and "unseen_acc" in evaluated
    again = sorted(r["client"] for r in federation.evaluate(state, 1)[1])
    assert again == sorted(r["client"] for r in rows) != sorted(r["client"] for r in federation.evaluate(state, 2)[1])


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
@pytest.mark.slow
def test_memory_stays_flat_as_clients_are_trained(tiny_recipe, tmp_path, device):
    """Ditto keeps a whole personal model (2.3 MB) per client: 64 clients trained with
    4 kept in memory must not grow host memory by what the other 60 would hold, nor
    device memory at all beyond a round's working set."""
    cfg = load_recipe(tiny_recipe, [*DRAW, "algorithm.name=ditto", "federation.clients=5000",
                                    "federation.clients_per_round=8", "federation.execution.states_in_memory=4",
                                    f"federation.execution.state_dir={tmp_path / 'spill'}", f"federation.execution.device={device}"])
    federation = Federation.build(cfg)
    state, host, allocated = federation.initial_state(), [], []
    for round_index in range(1, 9):
        state, _ = federation.fit_round(round_index, state)
        federation.clients.state_dict(tmp_path / "client_states", round_index)  # the checkpoint's share
        host.append(resident_mb())
        allocated.append(torch.cuda.memory_allocated() if device == "cuda" else 0)
    store = federation.clients.store
    assert len(store) == 64 and store.in_memory == 4
    # 48 more clients trained between round 2 and round 8: 110 MB of personal models if any were kept
    assert host[-1] - host[1] < 48, host
    if device == "cuda":
        assert max(allocated[1:]) - allocated[1] < 8 * 2**20, allocated
