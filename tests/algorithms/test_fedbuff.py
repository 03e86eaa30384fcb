"""FedBuff: staleness weights, arrivals in simulated time and the buffer's round trip
through tensors, against hand-computed numbers; a killed run resumes to the same run
(arrival order included)."""

import json

import pytest
import torch

from fedssl.algorithms.fedbuff import Buffer, InFlight, flush, next_arrival, staleness_weight
from fedssl.config.load import load_recipe
from fedssl.engine.checkpoint import load_checkpoint
from fedssl.engine.run import run_federation


def test_fedbuff_weighs_a_change_by_its_staleness():
    assert [staleness_weight(s) for s in (0, 3, 8)] == [1.0, 0.5, 1 / 3]
    params = {"w": torch.tensor([1.0, 2.0])}
    changes = [({"w": torch.tensor([2.0, 0.0])}, 0), ({"w": torch.tensor([0.0, 4.0])}, 3)]
    # w + lr / K * (1 * (2, 0) + 0.5 * (0, 4)) with K = 2, lr = 0.5
    assert torch.allclose(flush(params, changes, lr=0.5)["w"], torch.tensor([1.5, 2.5]))


def test_arrivals_follow_simulated_time_and_ties_the_start_order():
    def slot(client, arrival):
        return InFlight(client, 0, arrival, 1, 0.0, {"w": torch.zeros(1)})
    flying = {4: slot(9, 3.0), 2: slot(1, 5.0), 7: slot(3, 3.0), 5: slot(2, 1.0)}
    order = []
    while flying:
        order.append(flying.pop(next_arrival(flying)).client)
    assert order == [2, 9, 3, 1]


def test_the_buffer_round_trips_through_tensors():
    buffer = Buffer(12.5, 3, 8, {6: InFlight(4, 2, 14.25, 33, 0.7, {"w": torch.arange(3.0)})})
    extras = buffer.to_extras()
    assert all(isinstance(v, torch.Tensor) for v in extras.values())
    back = Buffer.from_extras(extras)
    assert (back.clock, back.version, back.started) == (12.5, 3, 8)
    slot = back.flying[6]
    assert (slot.client, slot.version, slot.arrival, slot.examples) == (4, 2, 14.25, 33)
    assert torch.equal(slot.delta["w"], torch.arange(3.0))


# --- a tiny run ---

@pytest.mark.slow
def test_a_killed_fedbuff_run_resumes_to_the_same_run(tiny_recipe, tmp_path):
    overrides = ["algorithm.name=fedbuff", "algorithm.fedbuff.buffer_size=2", "algorithm.fedbuff.concurrency=3",
                 "federation.system.profile=mobile", "federation.rounds=4", "federation.evaluation.eval_every=4"]
    cfg = load_recipe(tiny_recipe, overrides)
    run_federation(cfg, tmp_path / "whole")
    run_federation(load_recipe(tiny_recipe, overrides + ["federation.rounds=2"]), tmp_path / "killed")
    run_federation(cfg, tmp_path / "killed", resume=True)
    whole, resumed = load_checkpoint(tmp_path / "whole" / "checkpoint.pt"), load_checkpoint(tmp_path / "killed" / "checkpoint.pt")
    for part in ("params", "extras"):
        assert whole["server_state"][part].keys() == resumed["server_state"][part].keys()
        for name, array in whole["server_state"][part].items():
            assert torch.equal(resumed["server_state"][part][name], array), name
    rows = {}
    for run in ("whole", "killed"):
        rows[run] = [{k: r[k] for k in ("round", "sim_seconds", "sim_time", "staleness_mean")}
                     for r in map(json.loads, (tmp_path / run / "metrics.jsonl").open())]
    assert rows["whole"] == rows["killed"] and rows["whole"][-1]["staleness_mean"] > 0
