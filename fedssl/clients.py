"""The clients interface between the round engine and where clients run.

The engine (`fedssl.engine`) asks a `Clients` three things: fit these clients on
these payloads, keep what the clients whose updates were used learned, and score
these weights on these clients. `fedssl.inprocess.clients.InProcessClients` does it
in this process (one client after another, a cohort at once, or in worker
processes); `fedssl.backends.flower.server.FlowerClients` does it on Flower nodes,
each of which runs an `InProcessClients` of its own clients and nothing of the
server's. What crosses this seam is plain data (`fedssl.messages`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Iterator, Mapping, Protocol

from fedssl.messages import Arrays, Payload, Update


@dataclass(frozen=True)
class Holding:
    """What the server knows a client holds: `examples`, the most it can train on in
    a round (its labeled and unlabeled samples), `test_samples`, its local test
    split, and its `kind` (labeled, unlabeled or mixed)."""

    examples: int
    test_samples: int
    kind: str


@dataclass(frozen=True)
class Scored:
    """Clients' evaluation rows, and what scoring them cost: the bytes of the arrays
    sent to the nodes that scored them (in process, as if each client were its own
    node; the rows that come back are scalars, no arrays), and `dropped`, the rows
    that were unusable or never came."""

    rows: list[dict[str, Any]]
    bytes_down: int = 0
    dropped: int = 0


class Clients(Protocol):
    """Where a run's clients train and are scored."""

    @property
    def holdings(self) -> Mapping[int, Holding]:
        """What the server knows each client holds (replies are checked against it)."""

    def fit(self, round_index: int, payloads: dict[int, Payload]) -> Iterator[tuple[int, Update | Exception, str | None]]:
        """Train each client from its payload: its update as it comes, or the exception
        that stands for it and why it is unusable (it raised, it did not answer, its
        reply was malformed). The engine checks every update it receives."""

    def accept(self, client_ids: Collection[int]) -> None:
        """The clients of the last `fit` whose updates the server used: they keep what
        they learned in it; every other client of that fit keeps nothing from it."""

    def score(self, weights: Arrays, client_ids: list[int]) -> Scored:
        """Per client, the global model (`weights`) and its personalized model on its own
        local test split: {client, kind, test_samples, acc, loss, personal_acc, personal_loss, personal_f1}."""

    def state_dict(self, directory: Path | None = None, round_index: int = 0) -> dict:
        """What the clients keep, for the server's checkpoint of `round_index` (empty
        where it lives elsewhere): every client's, or once they are too many to hold,
        a manifest of the files under `directory` that hold them (`ClientStateStore`)."""

    def load_state_dict(self, states: dict, directory: Path | None = None) -> None:
        """Restore what `state_dict` returned (its files under `directory`)."""

    def close(self) -> None:
        """Release what the clients hold outside this process (worker processes), if anything."""


class Kinds(Mapping[int, str]):
    """Each client's kind (labeled, unlabeled, mixed), read from `holdings` when asked for."""

    def __init__(self, holdings: Mapping[int, Holding]):
        self.holdings = holdings

    def __getitem__(self, client_id: int) -> str:
        return self.holdings[client_id].kind

    def __iter__(self) -> Iterator[int]:
        return iter(self.holdings)

    def __len__(self) -> int:
        return len(self.holdings)
