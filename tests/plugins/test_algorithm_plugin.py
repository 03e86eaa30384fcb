"""An algorithm added from outside the package is one module: installed as another
package's `fedssl.algorithms` entry point, a recipe names it and sets its own keys,
it runs with its own server state on both backends, and the tests parametrized over
the registry smoke-test it with no list of algorithms to edit."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedssl.algorithms.base import ALGORITHMS
from fedssl.config.load import load_recipe
from fedssl.errors import UserError
from fedssl.engine.checkpoint import load_checkpoint
from fedssl.launch import launch

HERE = Path(__file__).parent


@pytest.fixture
def toy_installed(tmp_path, monkeypatch):
    """A distribution on the path (also of Flower's worker processes) declaring
    `[fedssl.algorithms] toy = toy_algorithm`."""
    site = tmp_path / "site"
    info = site / "toy_algorithm-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-algorithm\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[fedssl.algorithms]\ntoy = toy_algorithm\n")
    for path in (site, HERE):
        monkeypatch.syspath_prepend(str(path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), str(HERE), os.environ.get("PYTHONPATH", "")]))


def test_its_keys_are_checked_like_fedssls_own(tiny_recipe, toy_installed):
    assert load_recipe(tiny_recipe, ["algorithm.name=toy", "algorithm.toy.step=0.5"]).algorithm.toy.step == 0.5
    with pytest.raises(UserError, match=r"unknown key 'algorithm\.toy\.stpe' \(did you mean 'algorithm\.toy\.step'\?\)"):
        load_recipe(tiny_recipe, ["algorithm.name=toy", "algorithm.toy.stpe=0.5"])
    with pytest.raises(UserError, match=r"algorithm\.toy\.step: must be in \(0, 1\]"):
        load_recipe(tiny_recipe, ["algorithm.name=toy", "algorithm.toy.step=2"])


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["inprocess", "flower"])
def test_it_runs_from_a_recipe_with_its_own_server_state(tiny_recipe, toy_installed, backend):
    overrides = ["algorithm.name=toy", "algorithm.toy.step=0.5", "federation.rounds=2", f"federation.backend={backend}",
                 f"name=toy-{backend}"]
    _, run_dir, summary = launch(str(tiny_recipe), overrides)
    assert summary["algorithm"] == "toy" and summary["rounds"] == 2 and summary["dropped_clients"] == 0
    state = load_checkpoint(run_dir / "checkpoint.pt")["server_state"]
    assert int(state["extras"]["averaged"]) == 2 * 3  # two rounds of three clients
    assert all(bool(torch.isfinite(v).all()) for v in state["params"].values() if v.is_floating_point())
    assert json.loads((run_dir / "summary.json").read_text())["global_acc"] == summary["global_acc"]


@pytest.mark.slow
def test_the_tests_parametrized_over_the_registry_smoke_test_it_with_no_settings(toy_installed, tmp_path):
    """Installed, it is one more case of each registry-parametrized test, run with its
    `smoke` settings, the default (): no test keeps a list of algorithms to edit. A
    pytest of its own, since those tests read the registry when they are collected."""
    assert ALGORITHMS.get("toy").smoke == ()
    tests = HERE.parent
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--basetemp={tmp_path / 'inner'}",
                          "-k", "toy", str(tests / "algorithms" / "test_every_algorithm.py"),
                          str(tests / "engine" / "test_locality.py")],
                         cwd=tests.parent, capture_output=True, text=True)
    # test_every_algorithm's two rounds; test_locality's, in process and on Flower
    assert run.returncode == 0 and re.search(r"\b3 passed\b", run.stdout), run.stdout[-4000:] + run.stderr[-2000:]
