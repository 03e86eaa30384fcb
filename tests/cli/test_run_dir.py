"""The run directory is the one place fedssl writes and removes: a name cannot point
elsewhere, --overwrite removes only what fedssl created, a refused resume changes
nothing, and a run that failed before its first round is simply run again."""

import pytest

from cli_support import assert_user_error, run_cli
from fedssl.cli import main
from fedssl.run_dir import RUN_MARKER


@pytest.mark.parametrize("name", [".", "..", "", "a/b", "../outside", "a\\b"])
def test_a_name_that_is_not_a_directory_name_is_refused(tiny_recipe, tmp_path, capsys, name):
    planted = tmp_path / "planted.txt"
    planted.write_text("keep me")
    code, err = run_cli(capsys, "run", str(tiny_recipe), f"name={name}", "--overwrite")
    assert_user_error(code, err, "name")
    assert planted.read_text() == "keep me"
    assert not (tmp_path / "runs").exists()


def test_overwrite_removes_only_the_run_directory_fedssl_made(tiny_recipe, tmp_path, capsys):
    beside = tmp_path / "runs" / "beside.txt"
    assert main(["run", str(tiny_recipe), "federation.rounds=1"]) == 0
    beside.write_text("keep me")
    run_dir = tmp_path / "runs" / "tiny"
    assert (run_dir / RUN_MARKER).is_file()
    assert main(["run", str(tiny_recipe), "federation.rounds=1", "--overwrite"]) == 0
    assert beside.read_text() == "keep me" and (run_dir / "summary.json").is_file()

    # a directory fedssl did not create is never removed, even with --overwrite
    theirs = tmp_path / "runs" / "theirs"
    theirs.mkdir()
    (theirs / "thesis.tex").write_text("years of work")
    code, err = run_cli(capsys, "run", str(tiny_recipe), "name=theirs", "--overwrite")
    assert_user_error(code, err, str(theirs), "not created by fedssl")
    assert (theirs / "thesis.tex").read_text() == "years of work"


@pytest.mark.slow
def test_a_refused_resume_leaves_the_run_directory_byte_identical(tiny_recipe, tmp_path, capsys):
    assert main(["run", str(tiny_recipe), "federation.rounds=1"]) == 0
    run_dir = tmp_path / "runs" / "tiny"
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    for changed in ("seed=1", "train.lr=0.5"):
        code, err = run_cli(capsys, "run", str(tiny_recipe), "federation.rounds=2", changed, "--resume")
        assert_user_error(code, err, "cannot resume", changed.split("=")[0])
        assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before


def test_a_run_that_failed_before_its_first_round_is_run_again_as_is(tiny_recipe, tmp_path, capsys):
    # a data error after the run directory and config.yaml were written
    code, err = run_cli(capsys, "run", str(tiny_recipe), "federation.clients=500")
    assert code == 2, err
    run_dir = tmp_path / "runs" / "tiny"
    assert (run_dir / "config.yaml").is_file() and not (run_dir / "checkpoint.pt").exists()
    code, err = run_cli(capsys, "run", str(tiny_recipe), "--resume")
    assert_user_error(code, err, "never completed a round", "without --resume")
    assert main(["run", str(tiny_recipe), "federation.rounds=1"]) == 0  # the plain rerun reuses it
    assert (run_dir / "summary.json").is_file() and "clients: 500" not in (run_dir / "config.yaml").read_text()
