"""Recipe loading: schema + YAML recipe + CLI overrides -> a typed `RecipeConfig`.

A recipe may extend another with `base: NAME` (a shipped recipe's name, or a YAML
file beside the recipe, its path relative to the recipe's folder): the base is read
first (itself extending its own base, if any) and the recipe is merged onto it, so
a recipe says only what differs. A chain that comes back to a recipe is refused.

Every mistake a user can make here (a missing file, YAML that does not parse, an
unknown key, a value of the wrong type) becomes a `UserError` naming the file or
the dotted key, with the closest valid key for a misspelling.

A key that moved (`fedssl.config.moved`) may be given at its old path in a recipe
file, an override or a saved config: each is rewritten to the new paths as it is
read, each file of a base chain on its own.
"""

from __future__ import annotations

import io
import re
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from fedssl.config.moved import move_keys
from fedssl.config.schema import CodecConfig, recipe_schema, RecipeConfig
from fedssl.config.validate import validate
from fedssl.errors import UserError
from fedssl.registry import did_you_mean

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"

# A recipe is a few hundred values. These bounds refuse, before YAML builds anything,
# a file that would take memory or time without end: YAML aliases are shared when
# parsed but copied when OmegaConf converts them (a billion-laughs document of 1 KiB
# expands to 10^9 values), and PyYAML composes nested collections recursively.
MAX_RECIPE_BYTES = 1 << 20
MAX_RECIPE_VALUES = 10_000  # with aliases expanded; OmegaConf converts about 10^4 a second
MAX_RECIPE_DEPTH = 64
# `${oc.env:VAR}` resolves to the environment of whoever runs the recipe; a recipe is
# shared data, and a key's value lands in the run directory and on W&B, so a recipe
# from someone else could copy a secret (WANDB_API_KEY, a token) there. An override
# on one's own command line may still use it.
ENV_RESOLVER = re.compile(r"\$\{\s*oc\.env\b")


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
        recipe_cfg = OmegaConf.load(io.StringIO(recipe_text(path)))
    except yaml.reader.ReaderError as error:  # a character YAML does not allow in text, such as NUL
        raise UserError(f"{path}: not a text YAML file (character #x{error.character:04x} at "
                        f"position {error.position})") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}{where}: not valid YAML ({getattr(error, 'problem', error)})") from None
    except OmegaConfBaseException as error:  # a value OmegaConf does not hold, such as a !!binary or a date
        raise UserError(f"{path}: {str(error).splitlines()[0]}") from None
    if not isinstance(recipe_cfg, DictConfig):
        raise UserError(f"{path}: a recipe must be a mapping of keys to values")
    recipe_cfg = move_keys(recipe_cfg, str(path), announce=True)  # each file alone: its base may use the other paths
    if "base" not in recipe_cfg:
        return recipe_cfg
    base = recipe_cfg.pop("base")
    base_cfg = read_recipe(_base_path(path, base), (*chain, here))
    try:
        return OmegaConf.merge(base_cfg, recipe_cfg)
    except OmegaConfBaseException as error:
        raise UserError(f"{path}: cannot be merged onto its base {base}: {str(error).splitlines()[0]}") from None


def recipe_text(path: Path) -> str:
    """The text of the recipe file at `path`, once it is known to be small enough to build.

    Raises:
        UserError: a file over `MAX_RECIPE_BYTES`, not UTF-8 text, nested deeper than
            `MAX_RECIPE_DEPTH`, whose aliases expand past `MAX_RECIPE_VALUES` values,
            or that reads the environment (`ENV_RESOLVER`).
        yaml.YAMLError: the text does not parse.
    """
    with path.open("rb") as file:
        data = file.read(MAX_RECIPE_BYTES + 1)  # not stat: a file may grow after it
    if len(data) > MAX_RECIPE_BYTES:
        raise UserError(f"{path}: larger than {MAX_RECIPE_BYTES >> 20} MiB; a recipe is a few KiB of YAML")
    try:
        text = data.decode("utf-8-sig")  # -sig: an editor may start the file with a byte-order mark
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: not a text YAML file (byte {error.start} is not UTF-8)") from None
    check_yaml_events(text, lambda line: f"{path}, line {line}")
    return text


def check_yaml_events(text: str, where: Callable[[int], str], shared: bool = True) -> None:
    """Walk the YAML events of `text` (which build nothing) and refuse, naming
    `where(line)`, what would not build or could not be built in bounded memory.

    Counts each value as often as aliases repeat it, keeping the expanded size of
    each anchored node, so the count stays exact without expanding anything.
    `shared`: the text is a recipe file (`ENV_RESOLVER`), not the user's own override.
    """
    expanded = 0
    sizes: dict[str, int] = {}  # anchor -> values in its node, aliases expanded
    open_nodes: list[tuple[str | None, int]] = []  # collections not yet ended: (anchor, `expanded` before them)
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        line = where(event.start_mark.line + 1)
        if isinstance(event, yaml.AliasEvent):
            if any(anchor == event.anchor for anchor, _ in open_nodes):
                raise UserError(f"{line}: alias *{event.anchor} is inside the node it names; the value would be infinite")
            expanded += sizes.get(event.anchor, 0)  # an unknown anchor is YAML's error, when OmegaConf loads it
        elif isinstance(event, yaml.ScalarEvent):
            expanded += 1
            if event.anchor:
                sizes[event.anchor] = 1
            check_scalar(event, line, shared)
        elif isinstance(event, yaml.CollectionStartEvent):
            expanded += 1
            open_nodes.append((event.anchor, expanded - 1))
            if len(open_nodes) > MAX_RECIPE_DEPTH:
                raise UserError(f"{line}: nested deeper than {MAX_RECIPE_DEPTH} levels; a recipe is a few levels deep")
            check_untagged(event, line)
        elif isinstance(event, yaml.CollectionEndEvent):
            anchor, before = open_nodes.pop()
            if anchor:
                sizes[anchor] = expanded - before
        if expanded > MAX_RECIPE_VALUES:
            raise UserError(f"{line}: more than {MAX_RECIPE_VALUES:,} values (aliases *name expanded); "
                            "a recipe holds a few hundred")


def check_scalar(event: yaml.ScalarEvent, line: str, shared: bool) -> None:
    """Refuse a tagged scalar, and in a `shared` recipe one that reads the environment."""
    check_untagged(event, line)
    if shared and ENV_RESOLVER.search(event.value):
        raise UserError(f"{line}: ${{oc.env:...}} reads the environment of whoever runs the recipe, and a "
                        "recipe is shared data; give that key on the command line instead, e.g. "
                        "'key=${oc.env:VAR}'")


def check_untagged(event: yaml.NodeEvent, line: str) -> None:
    """Refuse an explicit tag: PyYAML builds a tagged value with bare int(), float(),
    datetime() calls (`!!int x` raises ValueError, `!!bool x` KeyError, `!!set [1]`
    TypeError), and a recipe's values are plain (quote a number to make it text)."""
    if event.tag is not None and event.tag != "!":  # "!": a quoted scalar's non-specific tag
        raise UserError(f"{line}: explicit YAML tag {event.tag}; a recipe's values are plain numbers, text, "
                        "lists and mappings")


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
            check_yaml_events(item.partition("=")[2], lambda _: f"override {item!r}", shared=False)
        except yaml.YAMLError as error:  # OmegaConf parses values as YAML: e.g. patterns=[*] is not valid
            raise not_yaml(item, error) from None
    try:
        return move_keys(OmegaConf.from_dotlist(list(overrides)), "overrides", announce=True)
    except OmegaConfBaseException as error:
        raise UserError(f"overrides: {str(error).splitlines()[0]}") from None
    except yaml.YAMLError as error:  # one that parses but does not build, e.g. a list as a mapping's key
        raise not_yaml(next((i for i in overrides if not _parses(i)), ""), error) from None


def not_yaml(item: str, error: yaml.YAMLError) -> UserError:
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return UserError(f"override {item!r}: its value is not valid YAML ({problem}); quote strings, e.g. 'key=[\"*.bn\"]'")


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
        # A layer may name keys by their old paths (fedssl.config.moved), e.g. a saved config.
        layer = move_keys(OmegaConf.create(layer) if not isinstance(layer, DictConfig) else layer, source)
        # Not OmegaConf.missing_keys: it resolves ${...} within the layer alone,
        # where a key the interpolation names (given by another layer) is not found.
        leaves = leaf_values(OmegaConf.to_container(layer))
        required = (required - {key for key, value in leaves if value != "???"}) | {
            key for key, value in leaves if value == "???"}
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
    try:
        return OmegaConf.to_object(merged)  # resolves ${...}: the layer that gave one is no longer known
    except OmegaConfBaseException as error:
        raise UserError(f"key {error.full_key!r}: cannot resolve its value ({str(error).splitlines()[0]})") from None


def leaf_values(tree: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of each leaf of a nested mapping (`???`: required, not given)."""
    leaves = []
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            leaves.extend(leaf_values(value, f"{prefix}{key}."))
        else:
            leaves.append((f"{prefix}{key}", value))
    return leaves


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
    "federation.robust.update_clip.multiple": 0.0,  # no update was clipped
}


def saved_config(config: dict[str, Any]) -> dict[str, Any]:
    """A config saved by any fedssl (a run directory's, a checkpoint's) with every
    key at its current path (`fedssl.config.moved`)."""
    return move_keys(config, "the saved config")


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

