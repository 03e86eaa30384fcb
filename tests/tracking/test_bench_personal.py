"""tools/bench_personal.py's table: the last rounds' mean beside PFLlib's best-round figure."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from fedssl.engine.checkpoint import load_checkpoint
from fedssl.run_dir import CHECKPOINT
from fedssl.tracking.runs import RunRecord, read_run_dir

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_personal", ROOT / "tools" / "bench_personal.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(history, rounds=12):
    return RunRecord(source="r", config={}, summary={"rounds": rounds, "seconds": 10.0, "global_acc": 0.5,
                                                     "personal_acc_p10": 0.2}, history=history)


def test_the_last_rounds_are_averaged_and_pfllib_best_is_a_maximum_over_rounds(bench):
    # 12 evaluated rounds, one training-only row between them
    history = [{"round": r, "personal_acc": r / 100, "personal_acc_pooled": r / 200, "client_acc_pooled": 0.9 if r == 1 else 0.0}
               for r in range(1, 13)]
    history.insert(5, {"round": 5.5, "train_loss": 1.0})
    record = run(history)
    assert bench.last_rounds_mean(record, "personal_acc") == pytest.approx(sum(range(3, 13)) / 10 / 100)
    assert bench.last_rounds_mean(record, "personal_acc_pooled", count=2) == pytest.approx((11 + 12) / 2 / 200)
    assert math.isnan(bench.last_rounds_mean(record, "global_acc"))
    # FedPer: the best round of its pooled personal accuracy; Ditto's best counts its
    # global model's evaluation too (here round 1's 0.9)
    assert bench.pfllib_best(record, "fedper") == pytest.approx(12 / 200)
    assert bench.pfllib_best(record, "ditto") == pytest.approx(0.9)


def test_the_table_sets_the_leaderboard_figure_beside_the_pooled_columns(bench):
    seeds = [run([{"round": 1, "personal_acc": acc, "personal_acc_pooled": acc - 0.1}]) for acc in (0.8, 0.9)]
    text = bench.table({"Ditto": ("ditto", seeds), "MOCHA": ("mocha", seeds[:1])})
    header, _, ditto, mocha = text.splitlines()
    assert "personal_acc_pooled" in header and "PFLlib leaderboard" in header
    cells = [c.strip() for c in ditto.strip("|").split("|")]
    assert cells[:7] == ["Ditto", "2", "12", "85.00 ± 7.07", "75.00 ± 7.07", "75.00 ± 7.07", "97.47"]
    assert [c.strip() for c in mocha.strip("|").split("|")][6] == "—"  # PFLlib publishes no figure


@pytest.mark.slow
def test_a_finished_run_with_fewer_rounds_is_extended_from_its_checkpoint(bench, tiny_recipe, tmp_path):
    """--rounds raised across sessions: the run continues where it ended, and ends
    where a run of that many rounds from the start ends."""
    base = [f"output_dir={tmp_path / 'runs'}", "federation.clients_per_round=2"]
    run_dir = bench.completed(str(tiny_recipe), [*base, "federation.rounds=1"], 1)
    assert read_run_dir(run_dir).summary["rounds"] == 1
    assert bench.completed(str(tiny_recipe), [*base, "federation.rounds=2"], 2) == run_dir
    extended = read_run_dir(run_dir)
    assert extended.summary["rounds"] == 2 and [row["round"] for row in extended.history] == [1, 2]
    straight = bench.completed(str(tiny_recipe), [*base, "federation.rounds=2", "name=straight"], 2)
    params = [load_checkpoint(d / CHECKPOINT)["server_state"]["params"] for d in (run_dir, straight)]
    torch.testing.assert_close(params[0], params[1], rtol=0, atol=0)
    with pytest.raises(SystemExit, match="more than the 1 asked"):
        bench.completed(str(tiny_recipe), [*base, "federation.rounds=1"], 1)
