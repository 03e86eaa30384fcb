"""`fedssl run --resume` of a run that already ran all its rounds: it says so and
prints the summary line without building a model, and leaves the run directory as
it was (no W&B run, no metrics line, no file touched)."""

import json
from pathlib import Path

import pytest
from cli_support import assert_user_error, run_cli

from fedssl.cli import main
from fedssl.engine.federation import Federation

pytestmark = pytest.mark.slow  # a real run of the tiny recipe (with W&B offline in the first test)


def snapshot(run_dir: Path) -> dict[str, tuple[int, int]]:
    """Every entry under `run_dir`, the directory itself included: its mtime and size."""
    entries = [run_dir, *run_dir.rglob("*")]
    return {str(p.relative_to(run_dir)): (p.stat().st_mtime_ns, p.stat().st_size) for p in entries}


def forbid_training(monkeypatch) -> None:
    """From here on, building a federation (a model, its data) fails the test."""
    def build(*args, **kwargs):
        raise AssertionError("a finished run was built again")

    monkeypatch.setattr(Federation, "build", build)


def run_with_output(capsys, *args) -> tuple[int, list[str], str]:
    """`fedssl args` in this process: its exit code, stdout's lines and stderr."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err


def test_resuming_a_finished_run_prints_its_summary_and_writes_nothing(tiny_recipe, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    recipe = [tiny_recipe, "federation.rounds=1", "logging.wandb.mode=offline"]
    code, ran, err = run_with_output(capsys, "run", *recipe)
    assert code == 0, err
    run_dir = tmp_path / "runs" / "tiny"
    before = snapshot(run_dir)
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1

    forbid_training(monkeypatch)
    code, resumed, err = run_with_output(capsys, "run", *recipe, "--resume")
    assert code == 0, err
    assert len(resumed) == 2 and "already complete" in resumed[0] and "round 1 of 1 done" in resumed[0]
    assert resumed[1] == ran[-1]  # the line the run itself ended with
    assert snapshot(run_dir) == before  # nothing written: no metrics line, no W&B run, no lock file left


def test_resuming_with_more_rounds_still_trains_them(tiny_recipe, tmp_path, capsys):
    assert run_cli(capsys, "run", tiny_recipe, "federation.rounds=1")[0] == 0
    code, err = run_cli(capsys, "run", tiny_recipe, "federation.rounds=2", "--resume")
    assert code == 0, err
    assert "already complete" not in capsys.readouterr().out
    run_dir = tmp_path / "runs" / "tiny"
    rounds = [json.loads(line)["round"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [1, 2] and json.loads((run_dir / "summary.json").read_text())["rounds"] == 2


def test_resuming_a_finished_run_under_a_changed_recipe_is_refused(tiny_recipe, tmp_path, capsys, monkeypatch):
    assert run_cli(capsys, "run", tiny_recipe, "federation.rounds=1")[0] == 0
    forbid_training(monkeypatch)
    assert_user_error(*run_cli(capsys, "run", tiny_recipe, "federation.rounds=1", "train.lr=0.5", "--resume"),
                      "cannot resume", "train.lr")
