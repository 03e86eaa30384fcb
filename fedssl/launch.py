"""Starting a run from a recipe: the run directory, the resolved config, the loop."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from omegaconf import MISSING, OmegaConf

from fedssl.config.load import load_recipe, to_dict
from fedssl.config.moved import moved_key
from fedssl.config.schema import RecipeConfig
from fedssl.config.validate import check_run_name
from fedssl.errors import UserError
from fedssl.io import ensure_dir
from fedssl.run_dir import CHECKPOINT, SUMMARY, prepare_run_dir
from fedssl.run_lock import hold_run_dir
from fedssl.sweep import run_name

def named_after(cfg: RecipeConfig, keys: Sequence[str]) -> RecipeConfig:
    """`cfg` renamed `NAME-key1=value1-...` after the resolved values of `keys`
    (a sweep's runs get distinct, readable names this way). Its W&B group, unless
    the recipe sets one, stays the name before renaming: the seeds of a recipe
    launched with `--name-from seed` share a group."""
    if not keys:
        return cfg
    resolved = OmegaConf.create(to_dict(cfg))
    values = []
    for key in keys:  # the name is made of the key as given, whose last part did not move
        if OmegaConf.select(resolved, moved_key(key), default=MISSING) is MISSING:
            raise UserError(f"--name-from: unknown key {key!r}")
        values.append(f"{key}={OmegaConf.select(resolved, moved_key(key))}")
    wcfg = cfg.logging.wandb
    grouped = replace(cfg.logging, wandb=replace(wcfg, group=wcfg.group or cfg.name))
    return replace(cfg, name=check_run_name(run_name(cfg.name, values)), logging=grouped)


def launch(
    recipe: str,
    overrides: Sequence[str] = (),
    resume: bool = False,
    overwrite: bool = False,
    name_from: Sequence[str] = (),
) -> tuple[RecipeConfig, Path, dict[str, Any]]:
    """Load the recipe, prepare `output_dir/name`, and run the federation in it.

    The recipe and the run directory are checked before any data is decoded, so
    that a typo fails in seconds (the schema's algorithm sections import the
    algorithm modules, and with them torch). The run holds its directory's lock
    from before it is prepared (or emptied) to after its last write.
    """
    cfg = named_after(load_recipe(recipe, overrides), name_from)
    ensure_dir(Path(cfg.output_dir), "output_dir")
    if cfg.federation.execution.state_dir:  # else a file there fails only when the first state spills
        ensure_dir(Path(cfg.federation.execution.state_dir), "federation.execution.state_dir")
    run_dir = Path(cfg.output_dir) / cfg.name
    with hold_run_dir(run_dir):
        prepare_run_dir(run_dir, resume, overwrite)  # config.yaml is written once a resume is known to be allowed

        if cfg.federation.backend == "flower":
            from fedssl.backends.flower.simulation import simulate

            return cfg, run_dir, simulate(cfg, run_dir, resume=resume)

        from fedssl.engine.run import run_federation

        return cfg, run_dir, run_federation(cfg, run_dir, resume=resume)


def complete(recipe: str, overrides: Sequence[str] = (), name_from: Sequence[str] = ()) -> tuple[Path, bool]:
    """Make sure the run exists and has finished: kept if it finished before,
    resumed if it was killed, started otherwise. Returns its directory and whether
    it was already finished (sweeps and benchmarks re-run this way complete
    themselves)."""
    cfg = named_after(load_recipe(recipe, overrides), name_from)
    run_dir = Path(cfg.output_dir) / cfg.name
    if (run_dir / SUMMARY).is_file():
        return run_dir, True
    launch(recipe, overrides, resume=(run_dir / CHECKPOINT).is_file(), name_from=name_from)
    return run_dir, False
