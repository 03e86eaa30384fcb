"""Sweeps of runs: a W&B sweep configuration, or the same grid run locally.

`fedssl sweep RECIPE --param key=v1,v2 --seeds 3` expands to one `fedssl run`
per combination of values and seeds. The runs share a W&B group (the sweep's
name) and are named after their overrides, so `fedssl compare --group NAME`
finds them and averages over seeds. With `--method random` or `bayes`, W&B's
agent draws the runs instead (random search, or Bayesian optimization of
`global_acc`), and a parameter may also be a range: `key=MIN..MAX` (uniform;
integers when both ends are) or `key=log:MIN..MAX` (log-uniform).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Sequence

import yaml

from fedssl.config.load import all_keys
from fedssl.config.moved import moved_key
from fedssl.config.validate import MAX_SEED, check_run_name
from fedssl.errors import UserError
from fedssl.registry import did_you_mean


METHODS = ("grid", "random", "bayes")  # W&B's sweep methods


@dataclass(frozen=True)
class Param:
    key: str
    values: tuple[Any, ...] = ()
    span: tuple[float, float] | None = None  # a range (random and bayes): MIN..MAX
    log: bool = False  # the range is drawn log-uniformly

    def wandb_parameter(self) -> dict[str, Any]:
        """This parameter in a W&B sweep configuration."""
        if self.span is None:
            return {"values": list(self.values)}
        low, high = self.span
        if self.log:
            return {"distribution": "log_uniform_values", "min": low, "max": high}
        whole = all(isinstance(v, int) for v in self.span)
        return {"distribution": "int_uniform" if whole else "uniform", "min": low, "max": high}


def parse_param(text: str) -> Param:
    """'train.lr=0.01,0.05' -> Param('train.lr', (0.01, 0.05)); values are YAML scalars.
    'train.lr=0.001..0.1' and 'train.lr=log:0.001..0.1' are ranges. A key at its
    old path (`fedssl.config.moved`) is kept at its new one."""
    key, sep, values = text.partition("=")
    if not sep or not key or not values:
        raise UserError(f"--param {text!r} must look like key=value1,value2,... or key=MIN..MAX")
    key = moved_key(key)
    if key not in all_keys():
        raise UserError(f"--param: unknown key {key!r}{did_you_mean(key, all_keys())}")
    if key in ("name", "seed"):
        raise UserError(f"--param: {key} is set by the sweep itself (use --seeds for seeds)")
    if ".." in values:
        log = values.startswith("log:")
        low, _, high = values.removeprefix("log:").partition("..")
        span = yaml.safe_load(low), yaml.safe_load(high)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in span) or not span[0] < span[1]:
            raise UserError(f"--param {text!r}: a range is MIN..MAX with numbers MIN < MAX")
        if log and not span[0] > 0:
            raise UserError(f"--param {text!r}: a log range needs MIN > 0")
        return Param(key, span=span, log=log)
    return Param(key, tuple(yaml.safe_load(v) for v in values.split(",")))


def seed_values(base_seed: int, seeds: int) -> list[int]:
    """The seeds of `--seeds N`: the recipe's seed, seed+1, ..., each a valid seed."""
    if seeds < 1:
        raise UserError(f"--seeds: must be at least 1 (seeds per combination), got {seeds}")
    if base_seed + seeds - 1 > MAX_SEED:
        raise UserError(f"--seeds: {seeds} seeds from seed {base_seed} go past the largest seed, {MAX_SEED}")
    return [base_seed + i for i in range(seeds)]


def check_sweep_name(given: str | None, recipe_name: str) -> str:
    """`--name`, or NAME-sweep; it names files in output_dir, so it is checked as a run name is."""
    return check_run_name(f"{recipe_name}-sweep" if given is None else given, key="--name")


def grid(params: Sequence[Param], seeds: Sequence[int]) -> list[list[str]]:
    """One list of key=value overrides per combination, seeds varying fastest."""
    ranged = [p.key for p in params if p.span is not None]
    if ranged:
        raise UserError(f"--param {ranged[0]}: a range is drawn by W&B's agent; use --method random or bayes")
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
    recipe: str, sweep_name: str, params: Sequence[Param], seeds: Sequence[int], fixed: Sequence[str] = (),
    method: str = "grid", run_cap: int | None = None,
) -> dict[str, Any]:
    """A W&B sweep (`method`: grid, random or bayes) whose agent launches `fedssl
    run RECIPE key=value ...`; `run_cap` bounds how many runs random and bayes draw.

    The agent's `${args_no_hyphens}` expands to `key=value` pairs, which is
    fedssl's override syntax; `fixed` overrides apply to every run. Each run
    streams to W&B (mode online) in the sweep's group and is named after its
    swept values. Bayes optimizes `global_acc`, the metric every method reports.
    """
    if method not in METHODS:
        raise UserError(f"--method: unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "grid":
        grid(params, seeds)  # refuses ranges
    parameters = {p.key: p.wandb_parameter() for p in params}
    parameters["seed"] = {"values": list(seeds)}
    return {
        "name": sweep_name,
        "method": method,
        **({"run_cap": run_cap} if run_cap and method != "grid" else {}),
        "metric": {"name": "global_acc", "goal": "maximize"},
        "parameters": parameters,
        "command": [
            "fedssl", "run", recipe, "--name-from", ",".join([p.key for p in params] + ["seed"]),
            *fixed, f"logging.wandb.group={sweep_name}", "logging.wandb.mode=online", "${args_no_hyphens}",
        ],
    }
