"""Checkpoints: written atomically (a crash never leaves a half-written file) and
read back as data only.

A checkpoint may come from someone else (a run directory sent for `fedssl
personalize`), so it is loaded with `torch.load(weights_only=True)`: tensors,
numbers, strings and containers of them, never an object whose unpickling runs
code. Everything fedssl saves is of those types; the RNG states are converted to
them (numpy's key is a tensor) and back.
"""

from __future__ import annotations

import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedssl.errors import UserError
from fedssl.io import atomic_write

FORMAT_VERSION = 2  # 2: RNG states as plain data, class names recorded


def rng_states() -> dict[str, Any]:
    """The global RNG states as tensors and plain numbers (what `weights_only` loads)."""
    version, internal, gauss = random.getstate()
    bit_generator, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {"bit_generator": bit_generator, "keys": torch.from_numpy(keys.astype(np.int64)),
                  "position": int(position), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }


def restore_rng_states(states: dict[str, Any]) -> None:
    python, numpy = states["python"], states["numpy"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss"]))
    np.random.set_state((numpy["bit_generator"], numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    torch.set_rng_state(states["torch"])


def save_checkpoint(path: Path, checkpoint: dict[str, Any]) -> None:
    payload = {"format": FORMAT_VERSION, **checkpoint, "rng": rng_states()}
    atomic_write(path, lambda file: torch.save(payload, file))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint` as data, or raise a `UserError`
    naming the file: it is missing, unreadable, holds anything but tensors and plain
    values (nothing in it is run), or is of another format."""
    if not path.is_file():
        raise UserError(f"no checkpoint to resume from: {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's message spans paragraphs of advice on loading trusted files: keep its first line
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"{path}: refused: it holds objects other than tensors and plain values, which "
                        f"fedssl checkpoints (format {FORMAT_VERSION}) never do; nothing in it was run ({reason})") from None
    except Exception as error:  # a truncated or crafted file fails deep in the unpickler, in many ways
        raise UserError(f"{path}: not a readable fedssl checkpoint ({type(error).__name__}: {error})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT_VERSION:
        found = checkpoint.get("format") if isinstance(checkpoint, dict) else None
        raise UserError(f"{path}: not a fedssl checkpoint of format {FORMAT_VERSION}"
                        + (f" (it is of format {found!r}; rerun the run with this fedssl)" if found is not None else ""))
    return checkpoint
