"""The run directory: the one place a run writes, and the only directories fedssl
ever empties (see `prepare_run_dir`). Its file names live here, below everything
that reads or writes them."""

from __future__ import annotations

import shutil
from pathlib import Path

from fedssl.errors import UserError
from fedssl.io import atomic_write_text

CHECKPOINT = "checkpoint.pt"
BEST_CHECKPOINT = "best.pt"  # the checkpoint of the round with the best global_acc so far
PARTITION = "partition.npz"
CLIENT_STATES = "client_states"  # snapshot files of clients' states, named by checkpoint.pt once they spill
CONFUSION_PNG = "confusion_matrix.png"
SUMMARY = "summary.json"
CONFIG = "config.yaml"
# Left in every run directory fedssl creates: the only directories --overwrite (or a
# retry) may empty, so that a name or an output_dir can never make fedssl delete
# anything it did not create.
RUN_MARKER = ".fedssl-run"
# Held locked by the one process writing the run directory (`fedssl.run_lock`); emptying
# the directory keeps it, so that no other process can lock a fresh one meanwhile.
LOCK = ".fedssl-lock"


def is_run_dir(path: Path) -> bool:
    """Whether fedssl created `path` as a run directory (a real directory, not a
    link to one, holding the marker)."""
    return path.is_dir() and not path.is_symlink() and (path / RUN_MARKER).is_file()


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Make `run_dir` ready for a run, or raise a `UserError` saying why it is not.
    Call it holding the directory's lock (`fedssl.run_lock.hold_run_dir`): it may
    empty the directory.

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
    if run_dir.exists() and any(entry.name != LOCK for entry in run_dir.iterdir()):
        if not is_run_dir(run_dir):
            raise UserError(f"{run_dir} exists and was not created by fedssl (it has no {RUN_MARKER}); "
                            f"choose another name=... or output_dir=..., or remove it yourself")
        if (run_dir / CHECKPOINT).is_file() and not overwrite:
            raise UserError(
                f"run directory {run_dir} already holds a run: pass --resume to continue it, "
                f"--overwrite to start over, or choose another name=..."
            )
        empty_run_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / RUN_MARKER, "a fedssl run directory: fedssl run --overwrite may empty it\n")


def empty_run_dir(run_dir: Path) -> None:
    """Remove everything in `run_dir` but its lock file (held by the caller)."""
    for entry in run_dir.iterdir():
        if entry.name == LOCK:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
