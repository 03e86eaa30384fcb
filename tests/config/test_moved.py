"""Keys that moved out of the flat `federation` section (fedssl.config.moved): their
old paths still work wherever a key is given, and resolve to the new ones."""

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from fedssl.cli import main
from fedssl.config.load import all_keys, load_recipe, merge_config, recipe_defaults, to_dict
from fedssl.config.moved import MOVED_KEYS, move_keys, moved_key
from fedssl.engine.checkpoint import load_checkpoint
from fedssl.engine.run import check_resumable, run_federation
from fedssl.errors import UserError
from fedssl.launch import named_after
from fedssl.sweep import parse_param
from fedssl.tracking.run_logger import read_metrics
from fedssl.tracking.runs import read_run_dir


def old_layout(config: dict) -> dict:
    """`config` (a saved config, nested) as an older fedssl wrote it: one flat `federation`."""
    federation = {**config["federation"]}
    for section in ("execution", "robust", "evaluation"):
        federation.update(federation.pop(section))
    return {**config, "federation": federation}


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_every_moved_key_names_a_key_of_the_schema_and_no_old_path_is_one():
    keys = set(all_keys())
    assert set(MOVED_KEYS.values()) <= keys
    assert not set(MOVED_KEYS) & keys
    assert moved_key("federation.update_clip.window") == "federation.robust.update_clip.window"
    assert moved_key("federation.rounds") == "federation.rounds"


def test_an_old_path_in_a_recipe_resolves_to_the_new_one(tiny_recipe):
    recipe = write(tiny_recipe.parent / "old.yaml", f"base: {tiny_recipe.name}\nfederation:\n  aggregator: median\n"
                   "  eval_every: 2\n  update_clip:\n    window: 3\n  workers: '0'\n")
    cfg = load_recipe(recipe)
    assert cfg.federation.robust.aggregator == "median" and cfg.federation.robust.update_clip.window == 3
    assert cfg.federation.evaluation.eval_every == 2 and cfg.federation.execution.workers == "0"
    new = load_recipe(tiny_recipe, ["federation.robust.aggregator=median", "federation.evaluation.eval_every=2",
                                    "federation.robust.update_clip.window=3", "federation.execution.workers='0'"])
    assert to_dict(cfg) == to_dict(new)


def test_an_old_path_in_an_override_resolves_to_the_new_one(tiny_recipe):
    cfg = load_recipe(tiny_recipe, ["federation.holdout_clients=1", "federation.update_clip.multiple=0",
                                    "federation.robust.update_clip.window=2"])  # one section, given both ways
    assert cfg.federation.evaluation.holdout_clients == 1
    assert (cfg.federation.robust.update_clip.multiple, cfg.federation.robust.update_clip.window) == (0, 2)
    assert load_recipe(tiny_recipe, ["federation.byzantine=0"]).federation.robust.byzantine == 0


def test_a_base_chain_may_mix_old_and_new_paths(tiny_recipe):
    """Each file is read on its own: a recipe overrides its base's old path with the new one, and back."""
    base = write(tiny_recipe.parent / "base_old.yaml", f"base: {tiny_recipe.name}\nfederation:\n  aggregator: median\n"
                 "  eval_every: 2\n")
    child = write(tiny_recipe.parent / "child_new.yaml", "base: base_old\nfederation:\n  robust:\n"
                  "    aggregator: trimmed_mean\n")
    grandchild = write(tiny_recipe.parent / "grandchild_old.yaml", "base: child_new\nfederation:\n  eval_every: 3\n")
    cfg = load_recipe(child)
    assert (cfg.federation.robust.aggregator, cfg.federation.evaluation.eval_every) == ("trimmed_mean", 2)
    cfg = load_recipe(grandchild, ["federation.robust.aggregator=mean"])
    assert (cfg.federation.robust.aggregator, cfg.federation.evaluation.eval_every) == ("mean", 3)


def test_an_old_path_in_a_saved_config_resolves_to_the_new_one(tiny_recipe):
    saved = old_layout(to_dict(load_recipe(tiny_recipe, ["federation.robust.aggregator=median"])))
    assert "aggregator" in saved["federation"] and "robust" not in saved["federation"]
    cfg = merge_config([saved], source="checkpoint.pt")  # as fedssl.trained reads a checkpoint's config
    assert cfg.federation.robust.aggregator == "median"
    assert move_keys(saved) == to_dict(cfg)


@pytest.mark.parametrize("overrides, old, new", [
    (["federation.aggregator=median", "federation.robust.aggregator=mean"],
     "federation.aggregator", "federation.robust.aggregator"),
    (["federation.update_clip.window=2", "federation.robust.update_clip.window=3"],
     "federation.update_clip.window", "federation.robust.update_clip.window"),
])
def test_an_old_path_with_its_new_one_is_a_one_line_error(tiny_recipe, overrides, old, new):
    with pytest.raises(UserError, match=f"^overrides: {old} and {new} are the same key") as error:
        load_recipe(tiny_recipe, overrides)
    assert "\n" not in str(error.value)
    recipe = write(tiny_recipe.parent / "both.yaml", f"base: {tiny_recipe.name}\nfederation:\n  eval_every: 2\n"
                   "  evaluation:\n    eval_every: 3\n")
    with pytest.raises(UserError, match="both.yaml: federation.eval_every and federation.evaluation.eval_every"):
        load_recipe(recipe)


def test_old_and_new_together_exit_2_from_the_cli(tiny_recipe, capsys):
    capsys.readouterr()
    code = main(["config", str(tiny_recipe), "federation.eval_every=2", "federation.evaluation.eval_every=3"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1
    assert "federation.eval_every" in lines[0] and "federation.evaluation.eval_every" in lines[0]


def test_a_misspelt_key_under_a_new_section_gets_the_closest_key(tiny_recipe):
    with pytest.raises(UserError, match=r"unknown key 'federation.robust.agregator' \(did you mean "
                                        r"'federation.robust.aggregator'\?\)"):
        load_recipe(tiny_recipe, ["federation.robust.agregator=median"])
    with pytest.raises(UserError, match=r"unknown key 'federation.evaluation.eval_evry'"):
        load_recipe(tiny_recipe, ["federation.evaluation.eval_evry=2"])


def test_sweep_params_and_name_from_take_old_paths(tiny_recipe):
    assert parse_param("federation.aggregator=mean,median").key == "federation.robust.aggregator"
    cfg = load_recipe(tiny_recipe, ["federation.robust.aggregator=median"])
    assert named_after(cfg, ["federation.aggregator"]).name == named_after(cfg, ["federation.robust.aggregator"]).name
    assert named_after(cfg, ["federation.aggregator"]).name.endswith("aggregator=median")


def test_a_checkpoint_config_in_the_old_layout_is_compared_at_the_new_paths(tiny_recipe):
    current = to_dict(load_recipe(tiny_recipe))
    check_resumable(old_layout(current), current)
    changed = old_layout(current)
    changed["federation"]["aggregator"] = "median"
    with pytest.raises(UserError, match="cannot resume: federation.robust.aggregator was 'median'"):
        check_resumable(changed, current)
    resumable = old_layout(current)
    resumable["federation"]["eval_every"] = 5  # may change between a killed run and its resumption
    check_resumable(resumable, current)
    defaults = recipe_defaults()
    del defaults["federation"]["robust"]["update_clip"]["multiple"]  # saved before the bound: nothing was clipped
    with pytest.raises(UserError, match=r"resume it with federation.robust.update_clip.multiple=0.0"):
        check_resumable(old_layout(defaults), recipe_defaults())


def test_a_run_whose_checkpoint_has_the_old_layout_resumes_bit_identically(tiny_recipe, tmp_path):
    keys = ["federation.robust.update_clip.window=2", "federation.evaluation.eval_clients=2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_federation(load_recipe(tiny_recipe, [*keys, "federation.rounds=2"]), straight)
    run_federation(load_recipe(tiny_recipe, [*keys, "federation.rounds=1"]), resumed)
    checkpoint = torch.load(resumed / "checkpoint.pt", map_location="cpu", weights_only=True)
    checkpoint["config"] = old_layout(checkpoint["config"])  # as an older fedssl saved it
    torch.save(checkpoint, resumed / "checkpoint.pt")
    config_yaml = resumed / "config.yaml"
    config_yaml.write_text(yaml.safe_dump(old_layout(yaml.safe_load(config_yaml.read_text()))))
    assert read_run_dir_config_keys(config_yaml) == to_dict(load_recipe(tiny_recipe, [*keys, "federation.rounds=1"]))

    run_federation(load_recipe(tiny_recipe, [*keys, "federation.rounds=2"]), resumed, resume=True)
    first, second = load_checkpoint(straight / "checkpoint.pt"), load_checkpoint(resumed / "checkpoint.pt")
    assert first["round"] == second["round"] == 2
    for name, array in first["server_state"]["params"].items():
        assert torch.equal(second["server_state"]["params"][name], array), name
    timeless = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert timeless(read_metrics(straight / "metrics.jsonl")) == timeless(read_metrics(resumed / "metrics.jsonl"))


def read_run_dir_config_keys(config_yaml: Path) -> dict:
    """A run directory's config as `fedssl compare` reads it (old paths moved)."""
    run_dir = config_yaml.parent
    scratch = run_dir.parent / f"{run_dir.name}-read"
    scratch.mkdir()
    shutil.copy(config_yaml, scratch / "config.yaml")
    (scratch / "summary.json").write_text("{}")
    (scratch / "metrics.jsonl").write_text("")
    return read_run_dir(scratch).config
