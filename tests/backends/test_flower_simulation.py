"""The Flower backend on Flower's simulation engine aggregates exactly as the
in-process loop: same seed, same recipe, same global model, same scores."""

import json
import os
import subprocess
import sys

import pytest
import torch

from fedssl.backends.flower.server import check_resumable
from fedssl.backends.flower.simulation import simulate
from fedssl.config.load import load_recipe
from fedssl.errors import UserError
from fedssl.engine.checkpoint import load_checkpoint
from fedssl.engine.federation import Federation
from fedssl.launch import launch

SCORES = ("global_acc", "global_f1_macro", "client_acc_mean", "personal_acc", "personal_acc_p10", "personal_f1_macro",
          "bytes_up", "bytes_down")


def same_run(tiny_recipe, overrides):
    """The recipe run on Flower's simulation engine and in process; both results."""
    _, flower_dir, flower = launch(str(tiny_recipe), overrides + ["name=flower", "federation.backend=flower"])
    _, local_dir, local = launch(str(tiny_recipe), overrides + ["name=local"])
    return flower_dir, flower, local_dir, local


@pytest.mark.slow
def test_fedssl_run_on_flower_aggregates_as_the_inprocess_loop_and_prints_fedssl_lines_not_the_engines(tiny_recipe):
    """`fedssl run` on Flower's simulation engine, in a process of its own as a user
    runs it, ends where the in-process loop ends. Flower, Ray and alembic log at INFO
    and Flower advises against run_simulation: the user sees the progress and the
    result, and warnings only. (One engine start serves both checks.)"""
    overrides = ["federation.rounds=2", "logging.wandb.mode=offline"]
    # one thread, as in this process and in Flower's actors (Ray gives each its num_cpus)
    done = subprocess.run([sys.executable, "-m", "fedssl.cli", "run", str(tiny_recipe), *overrides, "name=flower",
                           "federation.backend=flower"], capture_output=True, text=True, timeout=600,
                          env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    output = done.stdout + done.stderr
    noise = [line for line in output.splitlines()
             if line.startswith(("flwr:", "alembic", "ray")) or "DEPRECATED" in line or "FutureWarning" in line]
    assert noise == []
    flower_dir = tiny_recipe.parent / "runs" / "flower"
    flower = json.loads((flower_dir / "summary.json").read_text())
    assert f"flower: global_acc {flower['global_acc']:.4f}, " in done.stdout  # the summary the run returned
    _, local_dir, local = launch(str(tiny_recipe), overrides + ["name=local"])

    assert {k: flower[k] for k in SCORES} == {k: local[k] for k in SCORES} and flower["bytes_up"] > 0
    got = load_checkpoint(flower_dir / "checkpoint.pt")["server_state"]["params"]
    want = load_checkpoint(local_dir / "checkpoint.pt")["server_state"]["params"]
    assert list(got) == list(want)
    for name in want:  # float sums may differ in the last bits with another thread count
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)
    initial = Federation.build(load_recipe(tiny_recipe)).initial_state().params
    assert any(not torch.equal(got[n], initial[n]) for n in initial)  # it trained
    rounds = [json.loads(line) for line in (flower_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2] and all(r["dropped_clients"] == 0 for r in rounds)
    # W&B is written on the server side, as in process
    offline_runs = list((flower_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline_runs) == 1 and offline_runs[0].stat().st_size > 0


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["fedper", "fedmatch", "mocha"])
def test_flower_simulation_runs_personal_and_fedmatch_as_the_inprocess_loop(tiny_recipe, algorithm):
    """FedPer's heads and MOCHA's per-client models stay on the nodes and are scored
    there (MOCHA's anchors and per-client work travel in each client's payload);
    FedMatch's helpers and decomposed weights travel as records. Each ends where the
    in-process loop ends."""
    overrides = ["federation.rounds=2", f"algorithm.name={algorithm}"]
    if algorithm == "fedmatch":  # labels at the server, helpers sent from round 2 on
        overrides += ["data.labels.mode=server", "data.labels.server_per_class=5", "algorithm.ssl.server_steps=5",
                      "algorithm.fedmatch.helper_every=1", "train.lr=0.001", "train.momentum=0"]
    if algorithm == "mocha":  # Omega learned before round 2; clients draw their share of the steps
        overrides += ["algorithm.mocha.work_min=0.5", "algorithm.mocha.lam=0.01"]
    _, flower, _, local = same_run(tiny_recipe, overrides)
    assert flower["personal_acc"] == pytest.approx(local["personal_acc"], abs=1e-6)
    assert flower["global_acc"] == pytest.approx(local["global_acc"], abs=1e-6)
    assert flower["client_acc_mean"] == pytest.approx(local["client_acc_mean"], abs=1e-6)
    assert flower["personal_f1_macro"] == pytest.approx(local["personal_f1_macro"], abs=1e-6)  # from the nodes' rows
    if algorithm in ("fedper", "mocha"):
        assert flower["personal_acc"] != flower["client_acc_mean"]  # the heads (models) were personal


@pytest.mark.parametrize("overrides", [["algorithm.name=fedper"], ["algorithm.name=mocha"],
                                       ["algorithm.name=fixmatch", "algorithm.ssl.threshold=flexmatch"],
                                       ["algorithm.name=fixmatch", "algorithm.ssl.distribution_alignment=true"]])
def test_resuming_a_flower_run_whose_clients_keep_state_is_refused_before_the_engine_starts(tiny_recipe, overrides):
    cfg = load_recipe(tiny_recipe, [*overrides, "federation.backend=flower"])
    name = overrides[0].split("=")[1]
    with pytest.raises(UserError, match=f"cannot resume: with algorithm.name={name} .* each client keeps state"):
        simulate(cfg, tiny_recipe.parent / "runs" / "tiny", resume=True)


@pytest.mark.parametrize("algorithm", ["fedavg", "fixmatch", "fedmatch"])
def test_algorithms_whose_clients_keep_nothing_between_rounds_resume_on_flower(tiny_recipe, algorithm):
    check_resumable(load_recipe(tiny_recipe, [f"algorithm.name={algorithm}"]), resume=True)
