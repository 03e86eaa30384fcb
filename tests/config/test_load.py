import re
from pathlib import Path

import pytest

from fedssl.config.load import all_keys, load_recipe, merge_config, shipped_recipes, to_dict
from fedssl.config.schema import RecipeConfig
from fedssl.data.sources import load_source
from fedssl.errors import UserError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_recipe_and_overrides_merge_onto_schema(tmp_path):
    path = write(tmp_path, "name: r\nfederation:\n  rounds: 3\nmodel:\n  name: resnet18\n")
    cfg = load_recipe(path, ["federation.rounds=7", "logging.wandb.mode=disabled", "data.partition.alpha=0.1"])
    assert isinstance(cfg, RecipeConfig)
    assert cfg.federation.rounds == 7
    assert cfg.model.name == "resnet18"
    assert cfg.logging.wandb.mode == "disabled"
    assert cfg.data.partition.alpha == 0.1
    assert cfg.train.lr == RecipeConfig().train.lr


@pytest.mark.parametrize("recipe", shipped_recipes(), ids=lambda p: p.stem)
def test_every_shipped_recipe_loads(recipe):
    # fer2013 needs the user's CSV path; everything else loads as shipped
    overrides = ["data.path=/some/fer2013.csv"] if "fer2013" in recipe.stem else []
    cfg = load_recipe(recipe, overrides)
    assert cfg.name == recipe.stem


def test_misspelt_key_names_the_key_and_the_closest(tmp_path):
    path = write(tmp_path, "federation:\n  roundz: 3\n")
    with pytest.raises(UserError, match=r"federation\.roundz.*did you mean 'federation\.rounds'"):
        load_recipe(path)


def test_misspelt_override_is_caught(tmp_path):
    path = write(tmp_path, "name: r\n")
    with pytest.raises(UserError, match=r"data\.partition\.sheme.*data\.partition\.scheme"):
        load_recipe(path, ["data.partition.sheme=iid"])


def test_wrong_type_names_the_key(tmp_path):
    path = write(tmp_path, "federation:\n  rounds: many\n")
    with pytest.raises(UserError, match=r"federation\.rounds"):
        load_recipe(path)


def test_an_error_names_the_layer_it_is_in(tmp_path):
    path = write(tmp_path, "federation:\n  rounds: many\n")
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}: key 'federation.rounds'"):
        load_recipe(path)
    good = write(tmp_path, "name: r\n")
    with pytest.raises(UserError, match=r"^overrides: key 'federation.rounds'"):
        load_recipe(good, ["federation.rounds=many"])
    with pytest.raises(UserError, match=r"^overrides: unknown key 'federation.roundz'"):
        load_recipe(good, ["federation.roundz=3"])


def test_missing_recipe_file():
    with pytest.raises(UserError, match="recipe not found: nope.yaml"):
        load_recipe("nope.yaml")


def test_shipped_recipe_by_name():
    assert load_recipe("quickstart").name == "quickstart"


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "name: r\nfederation: [unclosed\n")
    with pytest.raises(UserError, match=r"recipe\.yaml, line \d+: not valid YAML"):
        load_recipe(path)


def test_required_value_left_out(tmp_path):
    path = write(tmp_path, "data:\n  source: fer2013\n  path: ???\n")
    with pytest.raises(UserError, match=r"'data\.path' needs a value"):
        load_recipe(path)


@pytest.mark.parametrize(
    "override, key",
    [
        ("federation.clients_per_round=50", "federation.clients_per_round"),
        ("federation.client_fraction=1.5", "federation.client_fraction"),
        ("train.optimizer=sgdd", "train.optimizer"),
        ("logging.wandb.mode=offlin", "logging.wandb.mode"),
        ("train.lr=0", "train.lr"),
        ("data.channels=2", "data.channels"),
        ("federation.concurrency=parallel", "federation.concurrency"),
        ("federation.concurrent_clients=0", "federation.concurrent_clients"),
        ("federation.max_update_ratio=0", "federation.max_update_ratio"),
    ],
)
def test_bad_values_name_the_key(tmp_path, override, key):
    path = write(tmp_path, "name: r\n")
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        load_recipe(path, [override])


@pytest.mark.parametrize("override, key", [
    ("data.partition.scheme=dirichlt", "data.partition.scheme"),
    ("data.source=synthetic", "data.source"),
    ("data.labels.mode=clients", "data.labels.mode"),
    ("data.augment=strnog", "data.augment"),
])
def test_a_data_choice_is_checked_before_anything_is_decoded(tmp_path, override, key):
    """The data package checks the names its section chooses by: config imports no
    data-building code, and still nothing is decoded before a typo is named."""
    cfg = load_recipe(write(tmp_path, "name: r\n"), [override, "data.num_samples=1000000000"])  # would take hours
    with pytest.raises(UserError, match=key.replace(".", r"\.") + ": unknown"):
        load_source(cfg.data)


def test_override_without_equals(tmp_path):
    with pytest.raises(UserError, match="key=value"):
        load_recipe(write(tmp_path, "name: r\n"), ["federation.rounds"])


def test_a_config_with_algorithm_sections_pickles(tmp_path):
    """Worker processes receive configs pickled: the schema's assembled classes must be findable."""
    import pickle

    cfg = load_recipe(write(tmp_path, "algorithm:\n  name: fedmatch\n  fedmatch:\n    tau: 0.5\n"))
    again = pickle.loads(pickle.dumps(cfg))
    assert again == cfg and again.algorithm.fedmatch.tau == 0.5


def test_resolved_config_round_trips():
    cfg = merge_config([{"seed": 3, "federation": {"rounds": 2}}])
    again = merge_config([to_dict(cfg)])
    assert again == cfg


def test_all_keys_lists_canonical_keys():
    keys = set(all_keys())
    for key in ("name", "seed", "output_dir", "model.name", "algorithm.name", "federation.rounds",
                "federation.clients", "federation.clients_per_round", "logging.wandb.mode", "data.source"):
        assert key in keys


def test_override_that_is_not_yaml_names_the_override(tmp_path):
    with pytest.raises(UserError, match=r"override 'algorithm\.personal\.patterns=\[\*\]'.*not valid YAML"):
        load_recipe(write(tmp_path, "name: r\n"), ["federation.rounds=2", "algorithm.personal.patterns=[*]"])
