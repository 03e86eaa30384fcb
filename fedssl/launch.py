"""Starting a run from a recipe: the run directory, the resolved config, the loop."""

from __future__ import annotations

from dataclasses import replace
import json
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


def resolve(recipe: str, overrides: Sequence[str] = (), name_from: Sequence[str] = ()) -> RecipeConfig:
    """The recipe with its overrides, named after `name_from`: the config a launch runs."""
    return named_after(load_recipe(recipe, overrides), name_from)


def finished_summary(cfg: RecipeConfig, run_dir: Path) -> dict[str, Any] | None:
    """The summary.json of the run in `run_dir` when it has already run all of
    `cfg.federation.rounds` rounds, else None.

    Resuming a finished run has nothing to train: building the federation only to
    evaluate it again took as long as a round and started a new W&B run. This only
    reads the directory, without its lock (the lock serializes writers), so the
    run directory is left exactly as it was. A larger `federation.rounds` is not
    finished: the resume trains the rounds added. A recipe that changed what the run
    computed is refused as any resume under it is.

    Raises:
        UserError: the checkpoint or summary.json is unreadable, or the recipe
            changed a key a resume may not change.
    """
    if not ((run_dir / SUMMARY).is_file() and (run_dir / CHECKPOINT).is_file()):
        return None
    from fedssl.engine.checkpoint import load_checkpoint
    from fedssl.engine.run import check_resumable

    checkpoint = load_checkpoint(run_dir / CHECKPOINT)
    if checkpoint.get("round") != cfg.federation.rounds:
        return None
    check_resumable(checkpoint["config"], to_dict(cfg))
    return read_summary(run_dir / SUMMARY)


def read_summary(path: Path) -> dict[str, Any]:
    """A run's summary.json, or a `UserError` naming it when it is not a JSON object
    (it is a file anyone may have edited)."""
    try:
        summary = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path}: not a readable summary ({error})") from None
    if not isinstance(summary, dict):
        raise UserError(f"{path}: not a readable summary (it holds no JSON object)")
    return summary


def launch(
    recipe: str,
    overrides: Sequence[str] = (),
    resume: bool = False,
    overwrite: bool = False,
    name_from: Sequence[str] = (),
) -> tuple[RecipeConfig, Path, dict[str, Any]]:
    """Load the recipe, prepare `output_dir/name`, and run the federation in it.

    A resume of a run that already ran all its rounds returns its summary.json at
    once and writes nothing (`finished_summary`).
    """
    cfg = resolve(recipe, overrides, name_from)
    run_dir = Path(cfg.output_dir) / cfg.name
    if resume and (summary := finished_summary(cfg, run_dir)) is not None:
        return cfg, run_dir, summary
    return cfg, run_dir, launch_resolved(cfg, resume, overwrite)


def launch_resolved(cfg: RecipeConfig, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Prepare `output_dir/name` and run the federation of `cfg` (resolved) in it;
    returns its summary.

    The recipe and the run directory are checked before any data is decoded, so
    that a typo fails in seconds (the schema's algorithm sections import the
    algorithm modules, and with them torch). The run holds its directory's lock
    from before it is prepared (or emptied) to after its last write.
    """
    ensure_dir(Path(cfg.output_dir), "output_dir")
    if cfg.federation.execution.state_dir:  # else a file there fails only when the first state spills
        ensure_dir(Path(cfg.federation.execution.state_dir), "federation.execution.state_dir")
    run_dir = Path(cfg.output_dir) / cfg.name
    with hold_run_dir(run_dir):
        prepare_run_dir(run_dir, resume, overwrite)  # config.yaml is written once a resume is known to be allowed

        if cfg.federation.backend == "flower":
            from fedssl.backends.flower.simulation import simulate

            return simulate(cfg, run_dir, resume=resume)

        from fedssl.engine.run import run_federation

        return run_federation(cfg, run_dir, resume=resume)


def complete(recipe: str, overrides: Sequence[str] = (), name_from: Sequence[str] = ()) -> tuple[Path, bool]:
    """Make sure the run exists and has finished: kept if it finished before,
    resumed if it was killed, started otherwise. Returns its directory and whether
    it was already finished (sweeps and benchmarks re-run this way complete
    themselves)."""
    cfg = resolve(recipe, overrides, name_from)
    run_dir = Path(cfg.output_dir) / cfg.name
    if (run_dir / SUMMARY).is_file():
        return run_dir, True
    launch_resolved(cfg, resume=(run_dir / CHECKPOINT).is_file())
    return run_dir, False
