"""What the round engine offers an algorithm that brings its own round.

`Algorithm.round` runs one round after the algorithm's `server_round`; by default
it is the engine's synchronous round (`RoundEngine.synchronous`). An algorithm
with rounds of its own (FedBuff's buffered ones, `fedssl.algorithms.fedbuff`)
drives the engine's stages through this interface instead, so that each of its
updates passes the same codecs, lossy link, checks and norm bound as a
synchronous round's, and is counted in the same metrics.
"""

from __future__ import annotations

from typing import Protocol

from fedssl.algorithms.aggregate import ServerState
from fedssl.messages import Arrays, Payload, Update


class RoundEngine(Protocol):
    """One round's view of the engine (`fedssl.engine.round_engine.EngineRound`)."""

    def synchronous(self, state: ServerState) -> tuple[ServerState, dict[str, float]]:
        """The synchronous round: a cohort drawn, trained, checked and aggregated."""

    def train(self, client_id: int, payload: Payload) -> tuple[Update, Arrays] | None:
        """Send `payload` to one client, train it and receive its update through the
        downlink, fit, uplink and check stages, and let the client keep what it
        learned: the update as the server uses it and the weights the client decoded
        from the payload (its update's starting point), or None where it was dropped
        (logged and counted)."""

    @property
    def timed(self) -> bool:
        """Whether clients have device profiles (`federation.system.profile`), and so simulated time."""

    def online(self, client_id: int, order: int) -> bool:
        """Whether the client is online when started as the round's `order`-th (always, untimed)."""

    def seconds(self, client_id: int, payload: Payload) -> float:
        """The client's simulated download, steps and upload for `payload` (0 untimed)."""

    def bound(self, updates: list[Update], references: list[Arrays]) -> list[Update]:
        """The updates through the norm bound (`fedssl.engine.update_bound`), each
        measured as its move from its reference; the clipped ones are counted."""

    def metrics(self, updates: list[Update]) -> dict[str, float]:
        """The round's metrics for `updates` (train loss, pseudo-labels per client kind)
        and its traffic: bytes, dropped and clipped clients, the lossy link's packets."""
