"""One round's view of the engine for an algorithm that brings its own round
(`fedssl.algorithms.rounds.RoundEngine`): the same stages a synchronous round
composes, one client at a time."""

from __future__ import annotations

import logging

from fedssl.algorithms.aggregate import ServerState
from fedssl.config.validate import lossy
from fedssl.engine.server import Server
from fedssl.engine.stages import Traffic, receive, send
from fedssl.engine.synchronous import synchronous_round
from fedssl.evaluation.metrics import round_metrics
from fedssl.messages import Arrays, Payload, Update
from fedssl.simulation.profiles import is_online


log = logging.getLogger(__name__)


class EngineRound:
    """Round `round_index` of `server`, and what it has sent, received, dropped and clipped so far."""

    def __init__(self, server: Server, round_index: int):
        self.server, self.round_index = server, round_index
        self.traffic = Traffic()

    def synchronous(self, state: ServerState) -> tuple[ServerState, dict[str, float]]:
        return synchronous_round(self.server, self.round_index, state)

    def train(self, client_id: int, payload: Payload) -> tuple[Update, Arrays] | None:
        encoded, sent = send(self.server, {client_id: payload})
        self.traffic.bytes_down += encoded[client_id].num_bytes
        for _, update, problem in self.server.clients.fit(self.round_index, encoded):
            if isinstance(update, Update):
                self.traffic.bytes_up += update.num_bytes
                if not problem:
                    received = receive(self.server, self.round_index, client_id, update, sent[client_id],
                                       self.traffic)
                    update, problem = received.update, received.problem
            if problem:
                log.warning("round %d: dropped the update of client %d: %s", self.round_index, client_id, problem)
                self.traffic.dropped += 1
                return None
            self.server.clients.accept([client_id])
            return update, sent[client_id].arrays
        raise AssertionError(f"the clients answered nothing for client {client_id}")

    @property
    def timed(self) -> bool:
        return self.server.system is not None and self.server.system.timed

    def online(self, client_id: int, order: int) -> bool:
        if not self.timed:
            return True
        system = self.server.system
        return is_online(system.profiles[client_id], self.server.cfg.seed, self.round_index, client_id, order)

    def seconds(self, client_id: int, payload: Payload) -> float:
        return self.server.system.work(client_id, payload).seconds() if self.timed else 0.0

    def bound(self, updates: list[Update], references: list[Arrays]) -> list[Update]:
        clip = self.server.bound.start_round()
        ready = [u for update, reference in zip(updates, references, strict=True)
                 for u, _ in clip.admit(update, reference)]
        ready += [u for u, _ in clip.finish()]
        self.server.bound.record(clip.norms)
        self.traffic.clipped += clip.clipped
        return ready

    def metrics(self, updates: list[Update]) -> dict[str, float]:
        lossy_link = lossy(self.server.cfg.federation.uplink.channel)
        return round_metrics(updates, self.server.kinds) | self.traffic.metrics(lossy_link)
