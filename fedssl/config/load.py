"""Recipe loading: schema + YAML recipe + CLI overrides -> a typed `RecipeConfig`.

A recipe may extend another with `base: NAME` (a shipped recipe's name, or a YAML
file beside the recipe, its path relative to the recipe's folder): the base is read
first (itself extending its own base, if any) and the recipe is merged onto it, so
a recipe says only what differs. A chain that comes back to a recipe is refused.

Every mistake a user can make here (a missing file, YAML that does not parse, an
unknown key, a value of the wrong type) becomes a `UserError` naming the file or
the dotted key, with the closest valid key for a misspelling.
"""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from fedssl.config.schema import CodecConfig, recipe_schema, RecipeConfig
from fedssl.config.validate import validate
from fedssl.errors import UserError
from fedssl.registry import did_you_mean

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"


def resolve_recipe_path(recipe: str) -> Path:
    """A recipe path, or the name of a shipped recipe ('quickstart')."""
    path = Path(recipe)
    if path.is_file():
        return path
    shipped = RECIPES_DIR / f"{recipe}.yaml"
    if not path.suffix and shipped.is_file():
        return shipped
    hint = did_you_mean(path.stem, [p.stem for p in shipped_recipes()])
    raise UserError(f"recipe not found: {recipe}{hint}")


def shipped_recipes() -> list[Path]:
    return sorted(RECIPES_DIR.glob("*.yaml"))


def load_recipe(recipe: str | Path, overrides: Sequence[str] = ()) -> RecipeConfig:
    """Merge the schema, the recipe file and `key=value` overrides, in that order."""
    path = resolve_recipe_path(str(recipe))
    return validate(merge_config([read_recipe(path), parse_overrides(overrides)], source=[str(path), "overrides"]))


def read_recipe(path: Path, chain: tuple[Path, ...] = ()) -> DictConfig:
    """The recipe file at `path` merged onto its `base` chain (not yet onto the schema).

    Raises:
        UserError: YAML that does not parse, a recipe that is not a mapping, a base
            that is not found, or a chain of bases that comes back to a recipe.
    """
    here = path.resolve()
    if here in chain:
        names = " -> ".join(p.stem for p in (*chain[chain.index(here):], here))
        raise UserError(f"{path}: its base chain comes back to itself ({names}); remove one of these base: keys")
    try:
        recipe_cfg = OmegaConf.load(path)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}{where}: not valid YAML ({getattr(error, 'problem', error)})") from None
    if not isinstance(recipe_cfg, DictConfig):
        raise UserError(f"{path}: a recipe must be a mapping of keys to values")
    if "base" not in recipe_cfg:
        return recipe_cfg
    base = recipe_cfg.pop("base")
    base_cfg = read_recipe(_base_path(path, base), (*chain, here))
    try:
        return OmegaConf.merge(base_cfg, recipe_cfg)
    except OmegaConfBaseException as error:
        raise UserError(f"{path}: cannot be merged onto its base {base}: {str(error).splitlines()[0]}") from None


def _base_path(recipe: Path, base: Any) -> Path:
    """`base` (as `recipe` names it) as a file: beside the recipe first, then the shipped recipes."""
    if not isinstance(base, str) or not base.strip():
        raise UserError(f"{recipe}: key 'base' must name a recipe, e.g. base: ssl_fixmatch_faces")
    name = Path(base).expanduser()
    candidates = [recipe.parent / name] if name.suffix else [recipe.parent / f"{base}.yaml", RECIPES_DIR / f"{base}.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    hint = "" if name.suffix else did_you_mean(base, [p.stem for p in shipped_recipes()])
    raise UserError(f"{recipe}: base {base!r} not found (looked for {', '.join(map(str, candidates))}){hint}")


def parse_overrides(overrides: Sequence[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise UserError(f"override {item!r} must look like key=value, e.g. federation.rounds=5")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as error:
        raise UserError(f"overrides: {error}") from None
    except yaml.YAMLError as error:  # OmegaConf parses values as YAML: e.g. patterns=[*] is not valid
        item = next((i for i in overrides if not _parses(i)), "")
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise UserError(f"override {item!r}: its value is not valid YAML ({problem}); quote strings, "
                        "e.g. 'key=[\"*.bn\"]'") from None


def _parses(override: str) -> bool:
    try:
        OmegaConf.from_dotlist([override])
    except yaml.YAMLError:
        return False
    return True


def merge_config(layers: Sequence[Any], source: str | Sequence[str] = "overrides") -> RecipeConfig:
    """Merge `layers` onto the schema and return the typed dataclass.

    `source` names where the layers come from in error messages: one name for all,
    or one per layer (a recipe file, then "overrides"). A layer may mark a key
    required with `???`; a later layer must then give it.
    """
    sources = [source] * len(layers) if isinstance(source, str) else list(source)
    merged = OmegaConf.structured(recipe_schema())
    required: set[str] = set()
    for layer, source in zip(layers, sources, strict=True):
        layer = OmegaConf.create(layer) if not isinstance(layer, DictConfig) else layer
        given = set(leaf_keys(OmegaConf.to_container(layer)))
        required = (required - given) | OmegaConf.missing_keys(layer)
        try:
            merged = OmegaConf.merge(merged, layer)
        except ConfigKeyError as error:
            key = error.full_key or error.key
            if getattr(error, "object_type", None) is CodecConfig:  # OmegaConf names no path inside a list
                takes = [f.name for f in fields(CodecConfig)]
                raise UserError(f"{source}: unknown key {key!r} in an entry of federation.uplink.codecs or "
                                f"federation.downlink.codecs{did_you_mean(str(key), takes)}; an entry takes "
                                f"{', '.join(takes)}") from None
            raise UserError(f"{source}: unknown key {key!r}{did_you_mean(str(key), all_keys())}") from None
        except ValidationError as error:
            first_line = str(error).splitlines()[0]
            raise UserError(f"{source}: key {error.full_key!r}: {first_line}") from None
        except OmegaConfBaseException as error:
            raise UserError(f"{source}: {str(error).splitlines()[0]}") from None
    if required:
        key = sorted(required)[0]
        raise UserError(f"{sources[0]}: key {key!r} needs a value, e.g. {key}=...")
    return OmegaConf.to_object(merged)


def leaf_keys(tree: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys of the leaves of a nested mapping whose value is given."""
    keys = []
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            keys.extend(leaf_keys(value, f"{prefix}{key}."))
        elif value != "???":
            keys.append(f"{prefix}{key}")
    return keys


def all_keys(schema: type | None = None, prefix: str = "") -> list[str]:
    """Every dotted key of the schema, leaves and sections alike."""
    schema = schema or recipe_schema()
    keys = []
    for f in fields(schema):
        key = f"{prefix}{f.name}"
        keys.append(key)
        default = f.default_factory() if callable(f.default_factory) else f.default
        if is_dataclass(default):
            keys.extend(all_keys(type(default), prefix=f"{key}."))
    return keys


def to_dict(cfg: RecipeConfig) -> dict[str, Any]:
    """The resolved config as plain data, for the run directory and W&B."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def recipe_defaults() -> dict[str, Any]:
    """Every key's default, as plain data (`???` where a recipe must give the key)."""
    return OmegaConf.to_container(OmegaConf.structured(recipe_schema()))


# Keys added with a default other than what fedssl did before they existed: a
# config written before holds no value for them, and its run behaved as this one.
BEHAVIOUR_BEFORE_THE_KEY = {
    "train.drop_last": False,  # every pass trained on its last, short batch
    "federation.update_clip.multiple": 0.0,  # no update was clipped
}


def saved_defaults() -> dict[str, Any]:
    """What a saved config (a run directory's, a checkpoint's) means by a key it
    lacks: the schema's default, or for a key of `BEHAVIOUR_BEFORE_THE_KEY`, what
    fedssl did before the key existed."""
    defaults = recipe_defaults()
    for dotted, value in BEHAVIOUR_BEFORE_THE_KEY.items():
        *sections, key = dotted.split(".")
        node = defaults
        for section in sections:
            node = node[section]
        node[key] = value
    return defaults


def to_yaml(cfg: RecipeConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))

