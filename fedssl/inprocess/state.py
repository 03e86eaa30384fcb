"""Per-client state that stays with the client between rounds.

Personal layers (FedPer's head, FedBN's normalization layers), Ditto's personal
model, FlexMatch's per-sample predictions: whatever a client keeps lives here,
keyed by client id. A population of thousands of clients does not fit in memory
once each keeps a model, so beyond `max_in_memory` clients the least recently used
states are spilled to disk, one file per client, each written atomically.

Checkpoints: while every state fits in memory, a checkpoint holds them all
(`state_dict`). Beyond that, gathering them would bring the spilled population back
into memory at every round, so a checkpoint holds a manifest instead: which
snapshot file, under the run's folder of client states, holds each client's state.
Each checkpoint writes only the states that changed since the one before (a round's
cohort), each to a new file named by client and round, never over a file an earlier
checkpoint names; a file replaced by a newer one is removed only at the next
checkpoint, once the checkpoint naming its successor has been written. A run killed
anywhere resumes from its last checkpoint's files, bit for bit.
"""

from __future__ import annotations

import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from fedssl.io import atomic_write

State = dict[str, torch.Tensor]
MANIFEST = "snapshots"  # the key of a checkpoint's client states that are held in snapshot files


class ClientStateStore:
    """Each client's personal arrays and algorithm state, keyed by client id.

    Up to `max_in_memory` states are held in memory (least recently used first out);
    the rest live on disk under `directory` (default: a temporary directory removed
    when the store is garbage collected or the process exits). A state is in memory
    or on disk, never both. `state_dict` gathers every state, wherever it lives, so
    a checkpoint holds them all and resuming does not depend on the spill files.

    Args:
        max_in_memory: how many clients' states stay in memory; None: all of them.
        directory: where spilled states are written, one `client<id>.pt` each.
    """

    def __init__(self, max_in_memory: int | None = None, directory: str | Path | None = None):
        if max_in_memory is not None and max_in_memory < 0:
            raise ValueError(f"max_in_memory must be >= 0, got {max_in_memory}")
        self.max_in_memory = max_in_memory
        self._directory = Path(directory) if directory else None
        self._temporary: tempfile.TemporaryDirectory | None = None
        self._memory: OrderedDict[int, State] = OrderedDict()
        self._on_disk: set[int] = set()
        self._snapshot_dir: Path | None = None  # the run's snapshot files, once a checkpoint wrote or named them
        self._saved: dict[int, int] = {}  # client -> round of the snapshot file holding its last checkpointed state
        self._changed: set[int] = set()  # clients whose state changed since the last snapshot
        self._superseded: list[Path] = []  # snapshot files the next checkpoint no longer names

    @property
    def directory(self) -> Path:
        """Where spilled states go; a temporary directory is made on first use."""
        if self._directory is None:
            self._temporary = tempfile.TemporaryDirectory(prefix="fedssl-client-states-")
            self._directory = Path(self._temporary.name)
        return self._directory

    def path(self, client_id: int) -> Path:
        return self.directory / f"client{client_id}.pt"

    def snapshot_path(self, client_id: int, round_index: int) -> Path:
        return self._snapshot_dir / f"client{int(client_id)}-r{int(round_index)}.pt"

    def get(self, client_id: int) -> State:
        """The client's state ({} if it has kept nothing yet)."""
        if client_id in self._memory:
            self._memory.move_to_end(client_id)
            return self._memory[client_id]
        if client_id in self._on_disk:
            # Read with weights_only: a spill file holds tensors only.
            state = torch.load(self.path(client_id), weights_only=True)
            self._on_disk.discard(client_id)
            self.path(client_id).unlink(missing_ok=True)
            self._hold(client_id, state)
            return state
        if client_id in self._saved:  # as the last checkpoint left it (a resumed run)
            state = self._read_snapshot(client_id)
            self._hold(client_id, state)
            return state
        return {}

    def peek(self, client_id: int) -> State:
        """The client's state, without moving it between disk and memory (for
        evaluation, which reads every client's state once)."""
        if client_id in self._on_disk:
            return torch.load(self.path(client_id), weights_only=True)
        if client_id not in self._memory and client_id in self._saved:
            return self._read_snapshot(client_id)
        return self._memory.get(client_id, {})

    def _read_snapshot(self, client_id: int) -> State:
        # weights_only: a snapshot, like a checkpoint, may come from elsewhere; it holds tensors only
        state = torch.load(self.snapshot_path(client_id, self._saved[client_id]), weights_only=True)
        if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                  for k, v in state.items()):
            raise ValueError(f"{self.snapshot_path(client_id, self._saved[client_id])}: not a client state")
        return state

    def put(self, client_id: int, state: State) -> None:
        if client_id in self._on_disk:
            self._on_disk.discard(client_id)
            self.path(client_id).unlink(missing_ok=True)
        self._memory.pop(client_id, None)
        self._changed.add(client_id)
        self._hold(client_id, state)

    def _hold(self, client_id: int, state: State) -> None:
        self._memory[client_id] = state
        limit = self.max_in_memory
        while limit is not None and len(self._memory) > limit:
            spilled, spilled_state = self._memory.popitem(last=False)
            atomic_write(self.path(spilled), lambda file, s=spilled_state: torch.save(s, file))
            self._on_disk.add(spilled)

    @property
    def in_memory(self) -> int:
        """How many states are held in memory now (the rest are on disk)."""
        return len(self._memory)

    def __len__(self) -> int:
        return len(self._ids())

    def __contains__(self, client_id: int) -> bool:
        return client_id in self._memory or client_id in self._on_disk or client_id in self._saved

    def _ids(self) -> set[int]:
        return set(self._memory) | self._on_disk | set(self._saved)

    def client_ids(self) -> list[int]:
        return sorted(self._ids())

    def state_dict(self, directory: str | Path | None = None, round_index: int = 0) -> dict[Any, Any]:
        """What a checkpoint holds of the clients' states: every state, while they all
        fit in memory (or without a `directory`, read back from disk where spilled);
        beyond that, a manifest {MANIFEST: {"clients", "rounds"}} of the snapshot files
        under `directory` that hold them, writing only the states that changed since
        the last call (see the module's docstring), for the checkpoint of `round_index`.

        Nothing moves between memory and disk. (Spilling is lossless, so where a
        state lives never changes a run's results.)
        """
        if directory is None or not (self._on_disk or self._saved):  # all in memory, never snapshotted
            return {client_id: self.peek(client_id) for client_id in self.client_ids()}
        self._snapshot_dir = Path(directory)
        self._snapshot_dir.mkdir(parents=True, exist_ok=True)
        for path in self._superseded:  # named by no checkpoint since the last one was written
            path.unlink(missing_ok=True)
        self._superseded = []
        for client_id in sorted(self._changed):  # every state not in a snapshot file has changed since
            state = self._memory.get(client_id) or self.peek(client_id)
            atomic_write(self.snapshot_path(client_id, round_index), lambda file, s=state: torch.save(s, file))
            if client_id in self._saved and self._saved[client_id] != round_index:
                self._superseded.append(self.snapshot_path(client_id, self._saved[client_id]))
            self._saved[client_id] = round_index
        self._changed = set()
        ids = sorted(self._saved)
        return {MANIFEST: {"clients": torch.tensor(ids, dtype=torch.int64),
                           "rounds": torch.tensor([self._saved[c] for c in ids], dtype=torch.int64)}}

    def load_state_dict(self, states: dict[Any, Any], directory: str | Path | None = None) -> None:
        """Replace everything with `states` (from a checkpoint): every state, spilled
        beyond the limit, or a manifest of snapshot files under `directory`, read
        when each client is next asked for. A `ValueError` if the manifest is malformed."""
        for client_id in list(self._on_disk):
            self.path(client_id).unlink(missing_ok=True)
        self._memory.clear()
        self._on_disk.clear()
        self._saved, self._changed, self._superseded = {}, set(), []
        if MANIFEST in states:
            self._load_manifest(states[MANIFEST], directory)
            return
        for client_id in sorted(states):
            self._hold(int(client_id), states[client_id])
            self._changed.add(int(client_id))

    def _load_manifest(self, manifest: Any, directory: str | Path | None) -> None:
        clients, rounds = (manifest.get("clients"), manifest.get("rounds")) if isinstance(manifest, dict) else (None, None)
        if directory is None or not all(isinstance(t, torch.Tensor) and t.dtype == torch.int64 and t.ndim == 1
                                        for t in (clients, rounds)) or len(clients) != len(rounds):
            raise ValueError("the client states' manifest must be two int64 vectors of one length, "
                             "and the folder of their snapshot files must be known")
        self._snapshot_dir = Path(directory)
        self._saved = dict(zip(clients.tolist(), rounds.tolist()))
        named = {self.snapshot_path(c, r).name for c, r in self._saved.items()}
        for path in self._snapshot_dir.glob("client*-r*.pt"):  # written after the checkpoint, or superseded
            if path.name not in named:
                path.unlink(missing_ok=True)


def checkpointed_states(states: dict[Any, Any], directory: str | Path) -> dict[int, State]:
    """Every client's state a checkpoint holds (its `client_states`), read from its
    snapshot files under `directory` where it names them (for tools and tests: a run
    reads them one client at a time)."""
    store = ClientStateStore()
    store.load_state_dict(states, directory)
    return {client_id: store.peek(client_id) for client_id in store.client_ids()}
