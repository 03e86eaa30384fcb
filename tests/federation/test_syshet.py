"""System heterogeneity: simulated time, round policies, FedNova and FedBuff.

Pure functions against hand-computed numbers; then a few tiny runs: every policy
with uniform profiles and no binding deadline is today's FedAvg bit for bit, a
round's simulated time is the max over its clients, and a killed FedBuff run
resumes to the same run (arrival order included)."""

import json
import math
from dataclasses import replace

import pytest
import torch

from fedssl.algorithms.aggregate import weighted_average
from fedssl.algorithms.fedbuff import flush, staleness_weight
from fedssl.algorithms.fednova import normalized_average, step_norm
from fedssl.cli import main
from fedssl.config.schema import SystemConfig
from fedssl.engine.stages import draw
from fedssl.errors import UserError
from fedssl.config.load import load_recipe
from fedssl.algorithms.fedbuff import Buffer, InFlight, next_arrival
from fedssl.engine.checkpoint import load_checkpoint
from fedssl.inprocess.client_data import STEP_BUDGET
from fedssl.engine.federation import Federation
from fedssl.simulation.profiles import build_profiles
from fedssl.simulation.policies import plan_round, round_seconds
from fedssl.engine.run import run_federation
from fedssl.simulation.simtime import Work
from fedssl.messages import Update

# --- simulated time and policies (pure) ---

WORK = {  # download, seconds per step, steps, upload
    0: Work(1.0, 0.5, 10, 2.0),  # 8 s
    1: Work(2.0, 2.0, 10, 4.0),  # 26 s
    2: Work(0.5, 1.0, 10, 0.5),  # 11 s
}


def test_a_rounds_simulated_time_is_its_slowest_clients_download_steps_and_upload():
    plan = plan_round("wait_all", WORK, offline=[], deadline=0, keep=3)
    assert plan.steps == {0: 10, 1: 10, 2: 10}
    assert round_seconds(plan, WORK) == pytest.approx(max(1 + 5 + 2, 2 + 20 + 4, 0.5 + 10 + 0.5)) == 26


def test_a_deadline_drops_late_clients_and_the_round_lasts_until_it():
    plan = plan_round("deadline", WORK, offline=[7], deadline=12.0, keep=3)
    assert plan.steps == {0: 10, 2: 10} and plan.late == [1] and plan.offline == [7]
    assert round_seconds(plan, WORK) == 12.0  # the server waited for client 1 until the deadline
    on_time = plan_round("deadline", WORK, offline=[], deadline=30.0, keep=3)
    assert on_time.late == [] and round_seconds(on_time, WORK) == 26


def test_overselection_keeps_the_first_to_finish():
    plan = plan_round("overselect", WORK, offline=[], deadline=0, keep=2)
    assert sorted(plan.steps) == [0, 2] and plan.late == [1]
    assert round_seconds(plan, WORK) == 11


def test_partial_work_runs_the_steps_that_fit_the_deadline():
    plan = plan_round("partial", WORK, offline=[], deadline=12.0, keep=3)
    # client 1: (12 - 2 - 4) / 2 = 3 steps; client 0 fits all 10; client 2 fits all 10 (11 s)
    assert plan.steps == {0: 10, 1: 3, 2: 10} and plan.partial == [1] and plan.late == []
    assert round_seconds(plan, WORK) == pytest.approx(max(8, 2 + 6 + 4, 11))
    # with no time for one step after the transfers, the client is late
    tight = plan_round("partial", WORK, offline=[], deadline=7.0, keep=3)
    assert 1 not in tight.steps and tight.late == [1] and tight.steps[0] == 8


def test_the_real_upload_size_replaces_the_estimate():
    plan = plan_round("wait_all", WORK, offline=[], deadline=0, keep=3)
    # client 2 sent 10x its estimate at 1 byte/s: 0.5 + 10 + 5 = 15.5 s, client 1 still 26 s
    assert round_seconds(plan, WORK, {2: 5}, {2: 1.0}) == 26
    assert round_seconds(plan, WORK, {2: 50}, {2: 1.0}) == pytest.approx(0.5 + 10 + 50)


# --- FedNova (pure) ---

def test_fednova_follows_the_papers_formula_on_a_hand_made_example():
    w = {"w": torch.tensor([1.0, 1.0])}
    clients = [({"w": torch.tensor([0.0, 1.0])}, 1, 2.0),  # n=1, tau=2
               ({"w": torch.tensor([1.0, -2.0])}, 3, 6.0)]  # n=3, tau=6
    # p = (1/4, 3/4); d_1 = (1, 0)/2, d_2 = (0, 3)/6; tau_eff = 2/4 + 18/4 = 5
    # w - 5 * (1/4 * (0.5, 0) + 3/4 * (0, 0.5)) = (1 - 0.625, 1 - 1.875)
    out = normalized_average(w, clients)
    assert torch.allclose(out["w"], torch.tensor([0.375, -0.875]))


def test_fednova_is_fedavg_when_every_client_does_equal_work():
    torch.manual_seed(0)
    w = {"a": torch.randn(4, 3), "b": torch.randn(3)}
    updates = [Update(c, {k: v + torch.randn_like(v) for k, v in w.items()}, n) for c, n in enumerate((5, 17, 9))]
    nova = normalized_average(w, [(u.arrays, u.num_examples, step_norm(7, momentum=0.9)) for u in updates])
    fedavg = weighted_average(updates)
    for name in w:
        torch.testing.assert_close(nova[name], fedavg[name], rtol=1e-6, atol=1e-6)


def test_the_step_norm_sums_the_local_step_coefficients():
    assert step_norm(5) == 5
    rho, tau = 0.9, 5  # momentum: a_k = (1 - rho^(tau - k)) / (1 - rho), k = 0..tau-1
    assert step_norm(tau, momentum=rho) == pytest.approx(sum((1 - rho ** (tau - k)) / (1 - rho) for k in range(tau)))
    lr, mu = 0.1, 0.5  # proximal: a_k = (1 - lr mu)^(tau - 1 - k)
    assert step_norm(tau, lr=lr, mu=mu) == pytest.approx(sum((1 - lr * mu) ** (tau - 1 - k) for k in range(tau)))


# --- FedBuff (pure) ---

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


# --- tiny runs ---

UNIFORM = ["federation.system.profile=uniform", "federation.system.speed=50", "federation.system.uplink=1e6",
           "federation.system.downlink=2e6"]


def one_round(recipe, overrides):
    federation = Federation.build(load_recipe(recipe, overrides))
    state = federation.initial_state()
    metrics = []
    for round_index in (1,):
        state, m = federation.fit_round(round_index, state)
        metrics.append(m)
    return federation, state, metrics


def test_every_policy_with_uniform_profiles_and_no_binding_deadline_is_fedavg(tiny_recipe):
    _, plain, _ = one_round(tiny_recipe, [])
    for policy in (["federation.system.policy=wait_all"],
                   ["federation.system.policy=deadline", "federation.system.deadline=1e6"],
                   ["federation.system.policy=partial", "federation.system.deadline=1e6"],
                   ["federation.system.policy=overselect", "federation.system.overselect=0"]):
        federation, state, metrics = one_round(tiny_recipe, UNIFORM + policy)
        for name, array in plain.params.items():
            assert torch.equal(state.params[name], array), (policy, name)
        assert all(m["late_clients"] == 0 and m["partial_clients"] == 0 for m in metrics)
    # the last one's simulated time is the max over its round's clients, by hand
    model_bytes = sum(a.numel() * a.element_size() for a in plain.params.values())
    sampled = draw(federation, 1, 0, set())
    steps = {c: len(federation.data.clients[c].labeled) // 16 for c in sampled}  # one epoch of full batches of 16 (train.drop_last)
    by_hand = max(model_bytes / 2e6 + steps[c] * 16 / 50 + model_bytes / 1e6 for c in sampled)
    assert metrics[0]["sim_seconds"] == pytest.approx(by_hand)


def test_partial_work_trains_fewer_steps_and_fednova_normalizes_them(tiny_recipe, tmp_path):
    # 16-image steps at 50/s: 0.32 s each; the deadline leaves some clients a few steps
    overrides = UNIFORM + ["federation.system.policy=partial", "federation.system.deadline=4.5",
                           "federation.rounds=2", "algorithm.name=fednova"]
    summary = run_federation(load_recipe(tiny_recipe, overrides), tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert sum(r["partial_clients"] for r in rows) > 0
    assert all(r["sim_seconds"] <= 4.5 for r in rows)
    assert summary["sim_time"] == pytest.approx(sum(r["sim_seconds"] for r in rows))
    assert math.isfinite(summary["global_acc"])


@pytest.mark.slow
def test_a_killed_fedbuff_run_resumes_to_the_same_run(tiny_recipe, tmp_path):
    overrides = ["algorithm.name=fedbuff", "algorithm.fedbuff.buffer_size=2", "algorithm.fedbuff.concurrency=3",
                 "federation.system.profile=mobile", "federation.rounds=4", "federation.eval_every=4"]
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


def run_cli(capsys, *args):
    capsys.readouterr()
    code = main(list(args))
    return code, capsys.readouterr().err


@pytest.mark.parametrize("row, fragment", [
    ("1,fast,1e6,1e6,1", "row 3: expected"),
    ("1,100,0,1e6,1", "row 3: uplink must be"),
    ("1,100,1e6,1e6,1.5", "row 3: online must be"),
    ("0,100,1e6,1e6,1", "row 3: client 0 appears twice"),
    ("9,100,1e6,1e6,1", "row 3: client 9 is not in"),
])
def test_a_bad_trace_row_is_refused_naming_the_file_and_row(tmp_path, row, fragment):
    trace = tmp_path / "trace.csv"
    trace.write_text("client,speed,uplink,downlink,online\n0,100,1e6,1e6,1\n" + row + "\n")
    with pytest.raises(UserError, match=f"{trace}: {fragment}"):
        build_profiles(SystemConfig(profile="trace", trace=str(trace)), clients=2, seed=0)


def test_a_bad_trace_exits_2_with_one_line(tiny_recipe, tmp_path, capsys):
    trace = tmp_path / "trace.csv"
    trace.write_text("client,speed,uplink,downlink,online\n0,100,1e6,1e6,1\n1,100,1e6,-3,1\n")
    code, err = run_cli(capsys, "run", str(tiny_recipe), "federation.system.profile=trace",
                        f"federation.system.trace={trace}", "federation.clients=2", "federation.clients_per_round=2")
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"{trace}: row 3: downlink must be" in err, err


def test_bad_system_settings_exit_2_naming_the_key(tiny_recipe, capsys):
    for overrides, key in ((["federation.system.policy=deadline"], "federation.system.policy"),
                           (UNIFORM + ["federation.system.policy=deadline"], "federation.system.deadline"),
                           (["federation.system.profile=uniform", "federation.system.speed=0"], "speed"),
                           (["algorithm.name=fedbuff", "algorithm.fedbuff.concurrency=3", "federation.backend=flower"], "federation.backend")):
        code, err = run_cli(capsys, "run", str(tiny_recipe), *overrides)
        assert code == 2 and "Traceback" not in err and key in err, err


def test_compare_plots_against_simulated_time_averaged_over_seeds():
    from fedssl.tracking.compare import curve
    from fedssl.tracking.runs import RunRecord
    runs = [RunRecord("a", {}, {}, [{"round": 1, "sim_time": 10.0, "global_acc": 0.2},
                                    {"round": 2, "sim_time": 30.0, "global_acc": 0.4}]),
            RunRecord("b", {}, {}, [{"round": 1, "sim_time": 20.0, "global_acc": 0.4},
                                    {"round": 2, "sim_time": 50.0, "global_acc": 0.6}])]
    x, mean, _ = curve(runs, "global_acc", x="sim_time")
    assert x.tolist() == [15.0, 40.0] and mean.tolist() == pytest.approx([0.3, 0.5])


def test_partial_work_on_flower_nodes_is_the_same_round(tiny_recipe, loopback_grid):
    from fedssl.backends.flower.client import app as client_app
    from fedssl.backends.flower.server import FlowerClients
    cfg = load_recipe(tiny_recipe, UNIFORM + ["federation.system.policy=partial", "federation.system.deadline=4.5"])
    grid = loopback_grid(client_app, {100: {"partition-id": "0,3"}, 101: {"partition-id": "1,4"},
                                      102: {"partition-id": "2,5"}})
    results = []
    for clients in (None, lambda server: FlowerClients.on_grid(server, grid)):
        federation = Federation.build(cfg, clients=clients)
        results.append(federation.fit_round(1, federation.initial_state()))
    (local, local_metrics), (remote, remote_metrics) = results
    assert local_metrics["partial_clients"] > 0 and remote_metrics["partial_clients"] == local_metrics["partial_clients"]
    for name, array in local.params.items():
        assert torch.equal(remote.params[name], array), name
    # the step budget reached the node: a partial client trained fewer steps than its budget
    federation = Federation.build(cfg)
    client = federation.data.clients[0]
    payload = replace(federation.algorithm.payload(1, federation.initial_state(), 0), config={STEP_BUDGET: 2})
    data = federation.trainer.client_data(0, client.labeled, client.unlabeled, payload)
    assert data.begin(federation.trainer.learner) == 2 < federation.system.steps[0]
