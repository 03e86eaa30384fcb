"""Grids of runs: a W&B sweep configuration, or the same grid run locally.

`fedssl sweep RECIPE --param key=v1,v2 --seeds 3` expands to one `fedssl run`
per combination of values and seeds. The runs share a W&B group (the sweep's
name) and are named after their overrides, so `fedssl compare --group NAME`
finds them and averages over seeds.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Sequence

import yaml

from fedssl.config.load import all_keys
from fedssl.errors import UserError
from fedssl.registry import did_you_mean


@dataclass(frozen=True)
class Param:
    key: str
    values: tuple[Any, ...]


def parse_param(text: str) -> Param:
    """'train.lr=0.01,0.05' -> Param('train.lr', (0.01, 0.05)); values are YAML scalars."""
    key, sep, values = text.partition("=")
    if not sep or not key or not values:
        raise UserError(f"--param {text!r} must look like key=value1,value2,...")
    if key not in all_keys():
        raise UserError(f"--param: unknown key {key!r}{did_you_mean(key, all_keys())}")
    if key in ("name", "seed"):
        raise UserError(f"--param: {key} is set by the sweep itself (use --seeds for seeds)")
    return Param(key, tuple(yaml.safe_load(v) for v in values.split(",")))


def seed_values(base_seed: int, seeds: int) -> list[int]:
    return [base_seed + i for i in range(seeds)]


def grid(params: Sequence[Param], seeds: Sequence[int]) -> list[list[str]]:
    """One list of key=value overrides per combination, seeds varying fastest."""
    combos = itertools.product(*(p.values for p in params), seeds)
    return [[f"{p.key}={v}" for p, v in zip(params, combo[:-1])] + [f"seed={combo[-1]}"] for combo in combos]


def run_name(base: str, overrides: Sequence[str]) -> str:
    """A run name made of the recipe's name and the last part of each overridden key."""
    parts = [base]
    for item in overrides:
        key, _, value = item.partition("=")
        parts.append(f"{key.rsplit('.', 1)[-1]}={value}".replace("/", "_").replace("\\", "_"))
    return "-".join(parts)


def wandb_sweep_config(
    recipe: str, sweep_name: str, params: Sequence[Param], seeds: Sequence[int], fixed: Sequence[str] = ()
) -> dict[str, Any]:
    """A W&B grid sweep whose agent launches `fedssl run RECIPE key=value ...`.

    The agent's `${args_no_hyphens}` expands to `key=value` pairs, which is
    fedssl's override syntax; `fixed` overrides apply to every run. Each run
    streams to W&B (mode online) in the sweep's group and is named after its
    swept values.
    """
    parameters = {p.key: {"values": list(p.values)} for p in params}
    parameters["seed"] = {"values": list(seeds)}
    return {
        "name": sweep_name,
        "method": "grid",
        "metric": {"name": "global_acc", "goal": "maximize"},
        "parameters": parameters,
        "command": [
            "fedssl", "run", recipe, "--name-from", ",".join([p.key for p in params] + ["seed"]),
            *fixed, f"logging.wandb.group={sweep_name}", "logging.wandb.mode=online", "${args_no_hyphens}",
        ],
    }
