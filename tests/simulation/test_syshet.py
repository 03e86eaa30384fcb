"""System heterogeneity: simulated time and round policies (FedNova's and FedBuff's
own tests are in tests/algorithms/).

Pure functions against hand-computed numbers; then a few tiny runs: every policy
with uniform profiles and no binding deadline is today's FedAvg bit for bit, a
round's simulated time is the max over its clients, and FedNova normalizes the
partial work of a deadline."""

import json
import math
from dataclasses import replace

import pytest
import torch

from fedssl.cli import main
from fedssl.config.schema import SystemConfig
from fedssl.engine.stages import draw
from fedssl.errors import UserError
from fedssl.config.load import load_recipe
from fedssl.inprocess.client_data import STEP_BUDGET
from fedssl.engine.federation import Federation
from fedssl.simulation.profiles import build_profiles
from fedssl.simulation.policies import plan_round, round_seconds
from fedssl.engine.run import run_federation
from fedssl.simulation.simtime import Work

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
