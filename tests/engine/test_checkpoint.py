"""Checkpoints are read back as data: a hostile checkpoint.pt is refused and its
pickle never runs, whichever command reads it."""

import os
import random

import numpy as np
import pytest
import torch

from fedssl.cli import main
from fedssl.errors import UserError
from fedssl.engine.checkpoint import FORMAT_VERSION, load_checkpoint, restore_rng_states, save_checkpoint


class RunsACommand:
    """What an attacker pickles: unpickling it would call os.system."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def plant_hostile_checkpoint(path, marker):
    """A checkpoint.pt that looks like fedssl's but whose config would run `touch marker`."""
    torch.save({"format": FORMAT_VERSION, "round": 1, "config": RunsACommand(f"touch {marker}")}, path)


def run_cli(capsys, *args):
    capsys.readouterr()
    code = main(list(args))
    return code, capsys.readouterr().err


def assert_refused(code, err, path):
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert str(path) in err and "refused" in err and "nothing in it was run" in err


def test_a_hostile_pickle_is_refused_by_load_checkpoint(tmp_path):
    path, marker = tmp_path / "checkpoint.pt", tmp_path / "pwned"
    plant_hostile_checkpoint(path, marker)
    with pytest.raises(UserError, match="refused"):
        load_checkpoint(path)
    assert not marker.exists()


def test_resume_and_personalize_refuse_a_hostile_checkpoint_without_running_it(tiny_recipe, tmp_path, capsys,
                                                                                  write_faces):
    assert main(["run", str(tiny_recipe), "federation.rounds=1"]) == 0
    run_dir, marker = tmp_path / "runs" / "tiny", tmp_path / "pwned"
    plant_hostile_checkpoint(run_dir / "checkpoint.pt", marker)
    config_before = (run_dir / "config.yaml").read_bytes()

    code, err = run_cli(capsys, "run", str(tiny_recipe), "federation.rounds=2", "--resume")
    assert_refused(code, err, run_dir / "checkpoint.pt")
    assert (run_dir / "config.yaml").read_bytes() == config_before

    write_faces(tmp_path / "mine", count=20)
    code, err = run_cli(capsys, "personalize", str(run_dir), "--data", str(tmp_path / "mine"))
    assert_refused(code, err, run_dir / "checkpoint.pt")
    assert not marker.exists()


def test_rng_states_survive_a_data_only_checkpoint(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.normal()  # numpy holds a cached gaussian now
    save_checkpoint(tmp_path / "c.pt", {"round": 1})
    expected = random.random(), np.random.normal(), np.random.random(), torch.rand(3)
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_states(load_checkpoint(tmp_path / "c.pt")["rng"])
    got = random.random(), np.random.normal(), np.random.random(), torch.rand(3)
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])
