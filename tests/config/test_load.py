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
        ("data.augment_backend=kornia", "data.augment_backend"),
        ("federation.execution.concurrency=parallel", "federation.execution.concurrency"),
        ("federation.execution.concurrent_clients=0", "federation.execution.concurrent_clients"),
        ("federation.robust.max_update_ratio=0", "federation.robust.max_update_ratio"),
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


def test_a_recipe_extends_its_base_beside_it_then_a_shipped_one(tmp_path):
    (tmp_path / "common.yaml").write_text("base: quickstart\ntrain:\n  lr: 0.2\nlogging:\n  wandb:\n    tags: [a, b]\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: common\nname: child\nfederation:\n  rounds: 2\nlogging:\n  wandb:\n    tags: [c]\n")
    cfg = load_recipe(child, ["train.momentum=0.5"])
    quickstart = load_recipe("quickstart")
    assert (cfg.name, cfg.federation.rounds, cfg.train.lr, cfg.train.momentum) == ("child", 2, 0.2, 0.5)
    assert cfg.federation.clients_per_round == quickstart.federation.clients_per_round == 5  # from quickstart
    assert cfg.logging.wandb.tags == ["c"]  # a list replaces the base's list
    nested = tmp_path / "sub" / "grandchild.yaml"
    nested.parent.mkdir()
    nested.write_text("base: ../child.yaml\nseed: 3\n")
    assert (load_recipe(nested).seed, load_recipe(nested).train.lr) == (3, 0.2)


def test_a_base_chain_that_comes_back_is_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b\n")
    (tmp_path / "b.yaml").write_text("base: a\n")
    with pytest.raises(UserError, match=r"base chain comes back to itself \(a -> b -> a\)"):
        load_recipe(tmp_path / "a.yaml")
    (tmp_path / "self.yaml").write_text("base: self\n")
    with pytest.raises(UserError, match=r"\(self -> self\)"):
        load_recipe(tmp_path / "self.yaml")


@pytest.mark.parametrize("base, message", [
    ("quickstrat", r"base 'quickstrat' not found .*did you mean 'quickstart'"),
    ("missing.yaml", r"base 'missing.yaml' not found"),
    ("[1, 2]", r"key 'base' must name a recipe"),
])
def test_a_bad_base_names_the_recipe(tmp_path, base, message):
    path = write(tmp_path, f"base: {base}\n")
    with pytest.raises(UserError, match=message) as error:
        load_recipe(path)
    assert str(path) in str(error.value)


@pytest.mark.slow
def test_shipped_recipes_that_extend_one_resolve_to_their_full_form():
    """Every shipped recipe with a base: the same config as the base merged by hand
    with the recipe's own keys (a check of the loader on the real files; the one-off
    check that each resolves exactly as its full form before this change is noted in
    the commit that made them extend)."""
    import yaml

    from fedssl.config.load import RECIPES_DIR

    extending = [p for p in shipped_recipes() if "base" in yaml.safe_load(p.read_text())]
    assert len(extending) >= 25
    resolved_bases = {}  # a few bases serve most recipes: each resolved once
    for path in extending:
        overrides = ["data.path=/x.csv"] if "fer2013" in path.stem else []
        own = yaml.safe_load(path.read_text())
        base = own.pop("base")
        assert (RECIPES_DIR / f"{base}.yaml").is_file()
        if (base, *overrides) not in resolved_bases:
            resolved_bases[(base, *overrides)] = to_dict(load_recipe(base, overrides))
        expected = to_dict(merge_config([resolved_bases[(base, *overrides)], own]))
        assert to_dict(load_recipe(path, overrides)) == expected, path.stem


def test_a_recipe_may_still_use_anchors_and_aliases(tmp_path):
    path = write(tmp_path, "name: r\nfederation:\n  rounds: &r 4\n  clients: *r\n  clients_per_round: *r\n"
                           "  uplink: &link\n    codecs: [{name: topk, fraction: 0.1, error_feedback: false}]\n  downlink: *link\n")
    cfg = load_recipe(path)
    assert (cfg.federation.rounds, cfg.federation.clients, cfg.federation.clients_per_round) == (4, 4, 4)
    assert cfg.federation.downlink.codecs[0].name == "topk"


def test_an_alias_bomb_is_refused_before_it_expands(tmp_path):
    levels = ['a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]'] + [
        f"{n}: &{n} [{', '.join([f'*{p}'] * 10)}]" for p, n in zip("abcdefgh", "bcdefghi")]
    path = write(tmp_path, "\n".join(levels) + "\n")
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}, line 4: more than 10,000 values"):
        load_recipe(path)


@pytest.mark.parametrize("value", ["!!int x", "!!bool x", "!!set {1}", "!!python/object/apply:os.system ['true']"])
def test_an_explicit_yaml_tag_is_refused_in_a_recipe_and_an_override(tmp_path, value):
    # PyYAML builds tagged values with bare int()/float()/set() calls: ValueError, KeyError, TypeError tracebacks
    path = write(tmp_path, f"name: r\nseed: {value}\n")
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}, line 2: explicit YAML tag"):
        load_recipe(path)
    with pytest.raises(UserError, match=r"^override ['\"]seed=.*['\"]: explicit YAML tag"):
        load_recipe("quickstart", [f"seed={value}"])
