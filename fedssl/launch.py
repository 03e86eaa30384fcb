"""Starting a run from a recipe: the run directory, the resolved config, the loop."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from omegaconf import MISSING, OmegaConf

from fedssl.config.load import load_recipe, to_dict
from fedssl.config.schema import RecipeConfig
from fedssl.config.validate import check_run_name
from fedssl.errors import UserError
from fedssl.io import atomic_write_text
from fedssl.sweep import run_name

CHECKPOINT = "checkpoint.pt"
SUMMARY = "summary.json"
CONFIG = "config.yaml"
# Left in every run directory fedssl creates: the only directories --overwrite (or a
# retry) may empty, so that a name or an output_dir can never make fedssl delete
# anything it did not create.
RUN_MARKER = ".fedssl-run"


def is_run_dir(path: Path) -> bool:
    """Whether fedssl created `path` as a run directory (a real directory, not a
    link to one, holding the marker)."""
    return path.is_dir() and not path.is_symlink() and (path / RUN_MARKER).is_file()


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Make `run_dir` ready for a run, or raise a `UserError` saying why it is not.

    A run directory fedssl created is emptied with `overwrite`, and also without it
    when its run never completed a round (it holds no checkpoint): a run that failed
    on a data or recipe error is simply run again. Anything else that is not empty
    is never removed.
    """
    if resume:
        if not (run_dir / CHECKPOINT).is_file():
            never = " (its run never completed a round: run it again without --resume)" if is_run_dir(run_dir) else ""
            raise UserError(f"cannot resume: {run_dir / CHECKPOINT} does not exist{never}")
        return
    if run_dir.is_symlink():
        raise UserError(f"run directory {run_dir} is a symbolic link: fedssl only writes run directories it creates")
    if run_dir.exists() and any(run_dir.iterdir()):
        if not is_run_dir(run_dir):
            raise UserError(f"{run_dir} exists and was not created by fedssl (it has no {RUN_MARKER}); "
                            f"choose another name=... or output_dir=..., or remove it yourself")
        if (run_dir / CHECKPOINT).is_file() and not overwrite:
            raise UserError(
                f"run directory {run_dir} already holds a run: pass --resume to continue it, "
                f"--overwrite to start over, or choose another name=..."
            )
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / RUN_MARKER, "a fedssl run directory: fedssl run --overwrite may empty it\n")


def named_after(cfg: RecipeConfig, keys: Sequence[str]) -> RecipeConfig:
    """`cfg` renamed `NAME-key1=value1-...` after the resolved values of `keys`
    (a sweep's runs get distinct, readable names this way)."""
    resolved = OmegaConf.create(to_dict(cfg))
    values = []
    for key in keys:
        if OmegaConf.select(resolved, key, default=MISSING) is MISSING:
            raise UserError(f"--name-from: unknown key {key!r}")
        values.append(f"{key}={OmegaConf.select(resolved, key)}")
    return replace(cfg, name=check_run_name(run_name(cfg.name, values)))


def launch(
    recipe: str,
    overrides: Sequence[str] = (),
    resume: bool = False,
    overwrite: bool = False,
    name_from: Sequence[str] = (),
) -> tuple[RecipeConfig, Path, dict[str, Any]]:
    """Load the recipe, prepare `output_dir/name`, and run the federation in it.

    The recipe and the run directory are checked before the heavy imports, so that
    a typo fails in a fraction of a second.
    """
    cfg = named_after(load_recipe(recipe, overrides), name_from)
    run_dir = Path(cfg.output_dir) / cfg.name
    prepare_run_dir(run_dir, resume, overwrite)  # config.yaml is written once a resume is known to be allowed

    if cfg.federation.backend == "flower":
        from fedssl.backends.flower.simulation import simulate

        return cfg, run_dir, simulate(cfg, run_dir, resume=resume)

    from fedssl.federation.loop import run_federation

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
