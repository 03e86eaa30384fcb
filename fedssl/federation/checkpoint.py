"""Checkpoints written atomically: a crash never leaves a half-written file."""

from __future__ import annotations

import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedssl.errors import UserError
from fedssl.io import atomic_write

FORMAT_VERSION = 1


def rng_states() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def restore_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])


def save_checkpoint(path: Path, checkpoint: dict[str, Any]) -> None:
    payload = {"format": FORMAT_VERSION, **checkpoint, "rng": rng_states()}
    atomic_write(path, lambda file: torch.save(payload, file))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint`, or raise a `UserError` naming it."""
    if not path.is_file():
        raise UserError(f"no checkpoint to resume from: {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, OSError) as error:
        raise UserError(f"{path}: not a readable fedssl checkpoint ({error})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT_VERSION:
        raise UserError(f"{path}: not a fedssl checkpoint of format {FORMAT_VERSION}")
    return checkpoint
