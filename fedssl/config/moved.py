"""Recipe keys that moved, and the rewriting that keeps their old paths working.

`federation` once held every key of a run's federation in one flat section; its
keys now live in sections by concern (`federation.execution`, `federation.robust`,
`federation.evaluation`). A recipe, a `base:` recipe, a `key=value` override, a
sweep's `--param`, `--name-from` and a config saved by an older fedssl (a run
directory's config.yaml, a checkpoint's) may still name a key by its old path:
each entry point rewrites it here, so the rest of fedssl sees only the new paths.

`MOVED_KEYS` is the one list of old path -> new path. A key moved as a section
(`federation.update_clip`) moves every key under it. Giving a key by its old and
its new path in one recipe (or one set of overrides) is refused: which one counts
would be a guess. Old paths are permanent aliases; a recipe or override that uses
one logs one line (at INFO) naming the new paths, and a saved config is read
without a word.
"""

from __future__ import annotations

import logging
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf

from fedssl.errors import UserError

log = logging.getLogger(__name__)

_EXECUTION = ("device", "concurrency", "concurrent_clients", "workers", "states_in_memory", "state_dir")
_ROBUST = ("aggregator", "trim_fraction", "byzantine", "krum_select", "min_clients", "round_retries",
           "max_update_ratio", "update_clip")
_EVALUATION = ("eval_every", "eval_clients", "holdout_clients", "holdout_steps", "linear_probe")

# Old dotted path -> new dotted path.
MOVED_KEYS: dict[str, str] = {
    **{f"federation.{key}": f"federation.execution.{key}" for key in _EXECUTION},
    **{f"federation.{key}": f"federation.robust.{key}" for key in _ROBUST},
    **{f"federation.{key}": f"federation.evaluation.{key}" for key in _EVALUATION},
}

Tree = TypeVar("Tree", dict, DictConfig)


def moved_key(dotted: str) -> str:
    """`dotted` at its new path: a moved key, or a key under a moved section; else as it is."""
    for old, new in MOVED_KEYS.items():
        if dotted == old or dotted.startswith(f"{old}."):
            return new + dotted[len(old):]
    return dotted


def uses_moved_keys(tree: Any) -> bool:
    """Whether the nested mapping `tree` names any key by its old path."""
    if not isinstance(tree, (dict, DictConfig)):
        return False
    for old in MOVED_KEYS:
        section, key = old.split(".")
        node = tree.get(section) if section in tree else None
        if isinstance(node, (dict, DictConfig)) and key in node:
            return True
    return False


def move_keys(tree: Tree, source: str = "", announce: bool = False) -> Tree:
    """`tree` (a recipe, or a saved config, nested) with every old path rewritten to
    its new one; `tree` itself when it names none. A `DictConfig` comes back as one
    (its `${...}` unresolved).

    Raises:
        UserError: a key given by both its old and its new path, naming both and `source`.
    """
    if not uses_moved_keys(tree):
        return tree
    plain = OmegaConf.to_container(tree, resolve=False) if isinstance(tree, DictConfig) else tree
    moved = {**plain}
    moved_from = []
    for old, new in MOVED_KEYS.items():
        section, key = old.split(".")
        if not isinstance(moved.get(section), dict) or key not in moved[section]:
            continue
        moved[section] = {k: v for k, v in moved[section].items() if k != key}
        value = plain[section][key]
        *parents, leaf = new.split(".")
        node = moved
        for part in parents:
            node[part] = {**node[part]} if isinstance(node.get(part), dict) else {}
            node = node[part]
        node[leaf] = _merged(node[leaf], value, new, old, source) if leaf in node else value
        moved_from.append(f"{old} -> {new}")
    if announce:
        where = f"{source}: " if source else ""
        log.info("%sold key paths, read at their new ones: %s", where, ", ".join(moved_from))
    return OmegaConf.create(moved) if isinstance(tree, DictConfig) else moved


def _merged(given: Any, old_value: Any, new: str, old: str, source: str) -> Any:
    """A section given both at its new path (`given`) and its old (`old_value`):
    one section, unless a key is in both."""
    if isinstance(given, dict) and isinstance(old_value, dict):
        both = sorted(set(given) & set(old_value))
        if not both:
            return {**given, **old_value}
        new, old = f"{new}.{both[0]}", f"{old}.{both[0]}"
    where = f"{source}: " if source else ""
    raise UserError(f"{where}{old} and {new} are the same key (it moved to {new}); give it once, as {new}")
