"""The command line as a user runs it: real processes, exit codes, files left behind."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedssl.config.load import shipped_recipes
from fedssl.engine.checkpoint import load_checkpoint


def fedssl(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedssl.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def start(*args: str) -> subprocess.Popen:
    """`fedssl args` started in a process of its own, running beside the test."""
    return subprocess.Popen([sys.executable, "-m", "fedssl.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=600)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def fedssl_beside(*commands: tuple[str, ...]) -> list[subprocess.CompletedProcess]:
    """Independent `fedssl` commands run at once (each process mostly imports: on two
    cores two of them take about the time of one); their results in order."""
    return [finish(process) for process in [start(*args) for args in commands]]


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_recipes_lists_one_line_each():
    result = fedssl("recipes")
    assert result.returncode == 0
    lines = result.stdout.strip().splitlines()
    assert len(lines) == len(shipped_recipes())
    assert any(line.startswith("quickstart ") for line in lines)


def test_recipes_wrap_to_a_terminals_width():
    import pty

    primary, secondary = pty.openpty()
    env = {**os.environ, "COLUMNS": "80"}
    process = subprocess.Popen([sys.executable, "-m", "fedssl.cli", "recipes"], stdout=secondary,
                               stderr=subprocess.PIPE, env=env)
    os.close(secondary)
    output = b""
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # EIO: the process closed its end
            break
        if not chunk:
            break
        output += chunk
    assert process.wait(timeout=120) == 0, process.stderr.read()
    lines = output.decode().splitlines()
    assert len(lines) > len(shipped_recipes()) and all(len(line) <= 80 for line in lines)


def test_a_reader_that_goes_away_is_no_error():
    process = subprocess.Popen([sys.executable, "-m", "fedssl.cli", "recipes"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, bufsize=0)
    process.stdout.read(10)  # `fedssl recipes | head -c 10`
    process.stdout.close()
    assert process.wait(timeout=120) in (0, 141)
    assert process.stderr.read() == b""


def test_version_and_run_help_say_where_to_look():
    from fedssl import __version__

    assert fedssl("--version").stdout.strip() == f"fedssl {__version__}"
    help_text = " ".join(fedssl("run", "--help").stdout.split())
    assert "fedssl config RECIPE" in help_text and "docs/recipe-reference.md" in help_text


@pytest.mark.slow
def test_misspelt_key_exits_2_with_one_line(tiny_recipe):
    assert_user_error(fedssl("run", str(tiny_recipe), "federation.roundz=2"), "federation.roundz", "federation.rounds")


@pytest.mark.slow
def test_wrong_type_exits_2(tiny_recipe):
    assert_user_error(fedssl("run", str(tiny_recipe), "federation.rounds=two"), "federation.rounds")


def test_missing_recipe_exits_2():
    assert_user_error(fedssl("run", "no/such/recipe.yaml"), "no/such/recipe.yaml")


@pytest.mark.slow
def test_missing_data_file_exits_2(tiny_recipe):
    result = fedssl("run", str(tiny_recipe), "data.source=fer2013", "data.path=/nonexistent/fer2013.csv")
    assert_user_error(result, "/nonexistent/fer2013.csv")


@pytest.mark.slow
def test_config_prints_the_resolved_recipe_as_yaml(tmp_path):
    import yaml

    from fedssl.config.load import load_recipe, to_dict

    result = fedssl("config", "ssl_fedprox_fixmatch_faces", "federation.rounds=3")
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed == to_dict(load_recipe("ssl_fedprox_fixmatch_faces", ["federation.rounds=3"]))
    # what the recipe file itself does not say: its base's keys and the schema's defaults
    assert printed["algorithm"]["proximal_mu"] == 0.01 and printed["algorithm"]["ssl"]["tau"] == 0.95
    assert printed["federation"]["rounds"] == 3 and "base" not in printed
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(result.stdout)
    assert to_dict(load_recipe(resolved)) == printed  # what it prints is a recipe that runs the same


@pytest.mark.slow
def test_config_errors_as_run_does():
    misspelt, no_data = fedssl_beside(("config", "quickstart", "federation.roundz=2"), ("config", "ssl_fixmatch_fer2013"))
    assert_user_error(misspelt, "federation.roundz", "federation.rounds")
    assert_user_error(no_data, "data.path")


@pytest.fixture(scope="module")
def finished_run(module_tiny_recipe) -> tuple[Path, Path]:
    """The tiny recipe run by `fedssl run` (W&B offline) once for the tests that read
    it or are refused on it: its recipe and run directory. Each such test leaves it as
    it was (a refused command changes nothing; test_run_dir.py shows it byte for byte)."""
    result = fedssl("run", str(module_tiny_recipe), "logging.wandb.mode=offline")
    assert result.returncode == 0, result.stderr
    return module_tiny_recipe, module_tiny_recipe.parent / "runs" / "tiny"


@pytest.mark.slow
def test_run_writes_the_run_directory(finished_run):
    tiny_recipe, run_dir = finished_run
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [1, 2, 3]
    assert all(0.0 <= m["global_acc"] <= 1.0 for m in metrics)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 3 and summary["global_acc"] == metrics[-1]["global_acc"] and summary["seconds"] > 0
    assert "rounds: 3" in (run_dir / "config.yaml").read_text()
    assert (run_dir / "partition.npz").is_file()
    offline_runs = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline_runs) == 1 and offline_runs[0].stat().st_size > 0
    # the same name again is refused rather than overwritten
    assert_user_error(fedssl("run", str(tiny_recipe)), "already holds a run", "--resume")


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoint.pt")["server_state"]["params"]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(tiny_recipe, tmp_path):
    # The killed run is killed at its first checkpoint: 5 rounds (several seconds) left
    # to kill it in, and 5 to resume. The uninterrupted run trains beside it.
    rounds = ["federation.rounds=6"]
    whole = start("run", str(tiny_recipe), *rounds, "name=whole")
    try:
        killed_dir = tmp_path / "runs" / "killed"
        process = subprocess.Popen([sys.executable, "-m", "fedssl.cli", "run", str(tiny_recipe), *rounds, "name=killed"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while not (killed_dir / "checkpoint.pt").exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        killed_at = load_checkpoint(killed_dir / "checkpoint.pt")["round"]
        assert killed_at < 6, "the run finished before it could be killed"

        result = fedssl("run", str(tiny_recipe), "--resume", *rounds, "name=killed")  # overrides may follow flags
        assert result.returncode == 0, result.stderr
        done = finish(whole)
        assert done.returncode == 0, done.stderr
    finally:
        whole.kill()
        whole.wait()
    whole, resumed = final_weights(tmp_path / "runs" / "whole"), final_weights(killed_dir)
    assert whole.keys() == resumed.keys()
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name
    metrics = [json.loads(line)["round"] for line in (killed_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics == list(range(1, 7))


@pytest.mark.slow
def test_resume_under_a_changed_recipe_is_refused(finished_run):
    tiny_recipe, _ = finished_run
    assert_user_error(fedssl("run", str(tiny_recipe), "train.lr=0.5", "--resume"), "train.lr")


@pytest.mark.slow
def test_resume_without_checkpoint(tiny_recipe):
    assert_user_error(fedssl("run", str(tiny_recipe), "--resume"), "checkpoint")


@pytest.mark.slow
def test_data_prints_the_partition_and_writes_pngs(tiny_recipe, tmp_path):
    result = fedssl("data", str(tiny_recipe), "--out", str(tmp_path / "report"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for client in range(6):
        assert any(line.split() and line.split()[0] == str(client) for line in lines), client
    for png in ("partition.png", "samples.png"):
        assert (tmp_path / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
