"""A threshold rule added from outside the package is one registered class: a
recipe names it, the learner uses it, its state is kept, backends see that it
keeps client state; another package adds one through an entry point."""

import importlib
import sys
from pathlib import Path

import pytest

from fedssl.config.load import load_recipe
from fedssl.errors import UserError
from fedssl.algorithms.base import build_algorithm
from fedssl.engine.federation import Federation

HERE = Path(__file__).parent


@pytest.fixture
def half_tau(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    return importlib.import_module("toy_threshold")


def test_a_registered_rule_runs_from_a_recipe_and_keeps_its_state(tiny_recipe, half_tau):
    cfg = load_recipe(tiny_recipe, ["algorithm.name=fixmatch", "algorithm.ssl.threshold=half_tau",
                                    "data.labels.mode=client", "data.labels.per_class=2", "train.local_steps=2"])
    assert build_algorithm(cfg).capabilities.keeps_client_state  # so a Flower run will not resume without it
    federation = Federation.build(cfg)
    state, _ = federation.fit_round(1, federation.initial_state())
    _, metrics = federation.fit_round(2, state)
    judged = {c: int(federation.clients.store.peek(c)["half_tau_judged"]) for c in federation.clients.store.client_ids()}
    assert judged and all(count > 0 for count in judged.values())
    assert metrics["dropped_clients"] == 0


def test_an_unknown_rule_is_a_user_error_naming_the_key(tiny_recipe):
    with pytest.raises(UserError, match=r"algorithm\.ssl\.threshold: unknown threshold rule 'flexmach'.*'flexmatch'"):
        load_recipe(tiny_recipe, ["algorithm.ssl.threshold=flexmach"])


def test_another_package_registers_through_its_entry_point(tiny_recipe, tmp_path, monkeypatch):
    """An installed distribution declaring `[fedssl.thresholds] toy = toy_rules`:
    its module is imported when a recipe names a rule fedssl does not know."""
    (tmp_path / "toy_rules.py").write_text(
        "from fedssl.ssl.thresholds import THRESHOLDS, FixedThreshold\n\n\n"
        "@THRESHOLDS.register('from_entry_point')\n"
        "class FromEntryPoint(FixedThreshold):\n"
        "    pass\n")
    info = tmp_path / "toy_rules-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-rules\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[fedssl.thresholds]\ntoy = toy_rules\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "toy_rules" not in sys.modules
    cfg = load_recipe(tiny_recipe, ["algorithm.name=fixmatch", "algorithm.ssl.threshold=from_entry_point"])
    assert "toy_rules" in sys.modules and not build_algorithm(cfg).capabilities.keeps_client_state
