"""Per-client state that stays with the client between rounds."""

from __future__ import annotations

import torch


class ClientStateStore:
    """Each client's personal arrays and algorithm state, keyed by client id.

    Saved with every checkpoint. Plain FedAvg keeps nothing here; personalization
    (personal heads, Ditto's personal model) and control variates will.
    """

    def __init__(self):
        self._states: dict[int, dict[str, torch.Tensor]] = {}

    def get(self, client_id: int) -> dict[str, torch.Tensor]:
        return self._states.get(client_id, {})

    def put(self, client_id: int, state: dict[str, torch.Tensor]) -> None:
        self._states[client_id] = state

    def __len__(self) -> int:
        return len(self._states)

    def state_dict(self) -> dict[int, dict[str, torch.Tensor]]:
        return dict(self._states)

    def load_state_dict(self, states: dict[int, dict[str, torch.Tensor]]) -> None:
        self._states = dict(states)
