"""Per-client state that stays with the client between rounds.

Personal layers (FedPer's head, FedBN's normalization layers), Ditto's personal
model, FlexMatch's per-sample predictions: whatever a client keeps lives here,
keyed by client id. A population of thousands of clients does not fit in memory
once each keeps a model, so beyond `max_in_memory` clients the least recently used
states are spilled to disk, one file per client, each written atomically.
"""

from __future__ import annotations

import tempfile
from collections import OrderedDict
from pathlib import Path

import torch

from fedssl.io import atomic_write

State = dict[str, torch.Tensor]


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

    @property
    def directory(self) -> Path:
        """Where spilled states go; a temporary directory is made on first use."""
        if self._directory is None:
            self._temporary = tempfile.TemporaryDirectory(prefix="fedssl-client-states-")
            self._directory = Path(self._temporary.name)
        return self._directory

    def path(self, client_id: int) -> Path:
        return self.directory / f"client{client_id}.pt"

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
        return {}

    def peek(self, client_id: int) -> State:
        """The client's state, without moving it between disk and memory (for
        evaluation, which reads every client's state once)."""
        if client_id in self._on_disk:
            return torch.load(self.path(client_id), weights_only=True)
        return self._memory.get(client_id, {})

    def put(self, client_id: int, state: State) -> None:
        if client_id in self._on_disk:
            self._on_disk.discard(client_id)
            self.path(client_id).unlink(missing_ok=True)
        self._memory.pop(client_id, None)
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
        return len(self._memory) + len(self._on_disk)

    def __contains__(self, client_id: int) -> bool:
        return client_id in self._memory or client_id in self._on_disk

    def client_ids(self) -> list[int]:
        return sorted(set(self._memory) | self._on_disk)

    def state_dict(self) -> dict[int, State]:
        """Every client's state, read back from disk where spilled (for checkpoints).

        Reading does not move anything between memory and disk. (Spilling is
        lossless, so where a state lives never changes a run's results.)
        """
        return {client_id: self.peek(client_id) for client_id in self.client_ids()}

    def load_state_dict(self, states: dict[int, State]) -> None:
        """Replace everything with `states` (from a checkpoint), spilling beyond the limit."""
        for client_id in list(self._on_disk):
            self.path(client_id).unlink(missing_ok=True)
        self._memory.clear()
        self._on_disk.clear()
        for client_id in sorted(states):
            self._hold(int(client_id), states[client_id])
