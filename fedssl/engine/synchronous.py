"""The synchronous round: a cohort drawn, trained and aggregated together, composed
of the stages in `fedssl.engine.stages`.

An update that raised or fails its checks (non-finite values, arrays of a wrong
name, shape or dtype, too many examples, too far from what was sent) is dropped
with a warning naming the client. With fewer usable updates than
federation.robust.min_clients (or than the aggregator needs), the round is drawn again
from the clients that did not fail, up to federation.robust.round_retries times, and then
the run stops. Under DP a Poisson draw may pick fewer clients than min_clients:
that is no fault, and the round is released as drawn. Only the accepted draw's
clients keep what they learned (`Clients.accept`).

A usable update longer than the norm bound (`fedssl.engine.update_bound`) is
clipped to it and counted. The bound comes from the recent rounds' updates; before
there are any, the round holds its updates until they have all arrived and takes
their median.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from fedssl.algorithms.aggregate import ServerState
from fedssl.algorithms.robust import minimum_updates
from fedssl.config.validate import lossy
from fedssl.engine.server import Server
from fedssl.engine.stages import Fold, Traffic, aggregate, draw, receive, send
from fedssl.engine.update_bound import RoundClip
from fedssl.errors import UserError
from fedssl.evaluation.metrics import round_metrics
from fedssl.messages import Update


log = logging.getLogger(__name__)


@dataclass
class Draws:
    """What a round's draws left behind: who failed and why, what raised, each
    client's update size and each draw's plan (the device profiles' timing)."""

    failed: dict[int, str] = field(default_factory=dict)
    raised: list[Exception] = field(default_factory=list)
    received: dict[int, int] = field(default_factory=dict)
    plans: list = field(default_factory=list)


def synchronous_round(server: Server, round_index: int, state: ServerState) -> tuple[ServerState, dict[str, Any]]:
    """Draw, train, check and fold a cohort (redrawn while too few updates are usable),
    then aggregate: the new server state and the round's metrics."""
    fed, robust = server.cfg.federation, server.cfg.federation.robust
    needed = max(robust.min_clients, minimum_updates(robust))
    traffic, draws = Traffic(), Draws()
    for attempt in range(robust.round_retries + 1):
        sampled, fold, clip = train_cohort(server, round_index, attempt, state, traffic, draws)
        if len(fold.receipts) >= (min(needed, len(sampled)) if server.privacy else needed):
            break
        if attempt < robust.round_retries:
            log.warning("round %d: %d usable updates of %d sampled clients, fewer than %d; drawing the round again "
                        "(retry %d of %d)", round_index, len(fold.receipts), len(sampled), needed, attempt + 1,
                        robust.round_retries)
    else:
        raise too_few(server, round_index, len(fold.receipts), len(sampled), needed, draws)
    server.clients.accept([u.client_id for u in fold.receipts])
    if clip.clipped:
        log.info("round %d: clipped %d of %d updates to the norm bound %.3g", round_index, clip.clipped,
                 len(fold.receipts), clip.bound)
    server.bound.record(clip.norms)
    traffic.dropped, traffic.clipped = len(draws.failed), clip.clipped
    system = server.system.finish(draws.plans, draws.received) if server.system is not None else {}
    metrics = round_metrics(fold.receipts, server.kinds) | traffic.metrics(lossy(fed.uplink.channel)) | system
    state, privacy_metrics = aggregate(server, fold.updates(state.params), state, round_index)
    return state, metrics | privacy_metrics


def train_cohort(server: Server, round_index: int, attempt: int, state: ServerState, traffic: Traffic,
                 draws: Draws) -> tuple[list[int], Fold, RoundClip]:
    """One draw of the round: its clients, their usable updates folded, and the pass
    through the norm bound that admitted them."""
    sampled = draw(server, round_index, attempt, set(draws.failed))
    payloads = {c: server.algorithm.payload(round_index, state, c) for c in sampled}
    if server.system is not None:  # who is online, late or partial (server.system.policy)
        plan, payloads = server.system.plan(round_index, attempt, payloads)
        draws.plans.append((plan, payloads))
    encoded, sent = send(server, payloads)
    channel = server.cfg.federation.uplink.channel
    fold = Fold(server.averages_as_they_come, lossy(channel) and channel.strategy == "mean")
    clip = server.bound.start_round()
    for client_id, update, problem in server.clients.fit(round_index, encoded):
        traffic.bytes_down += encoded[client_id].num_bytes
        masks = None
        if isinstance(update, Update):  # it came, usable or not
            traffic.bytes_up += update.num_bytes
            draws.received[client_id] = update.num_bytes
            if not problem:
                received = receive(server, round_index, client_id, update, sent[client_id], traffic)
                update, problem, masks = received.update, received.problem, received.masks
        if problem:
            log.warning("round %d: dropped the update of client %d: %s", round_index, client_id, problem)
            draws.failed[client_id] = problem
            if isinstance(update, Exception):
                draws.raised.append(update)
            continue
        if server.system is not None:
            update = server.system.annotate(plan, update)
        for admitted, masks in clip.admit(update, sent[client_id].arrays, masks):
            fold.add(admitted, masks)
    for admitted, masks in clip.finish():
        fold.add(admitted, masks)
    return sampled, fold, clip


def too_few(server: Server, round_index: int, usable: int, sampled: int, needed: int, draws: Draws) -> UserError:
    """The error that stops a run whose round got too few usable updates, chained to a
    client's exception, so that a bug in a learner keeps its traceback in Python."""
    robust = server.cfg.federation.robust
    reasons = "; ".join(f"client {c}: {why}" for c, why in draws.failed.items()) or "no client failed"
    if draws.plans:  # clients the round policy left out
        reasons += "; " + server.system.left_out(draws.plans)
    retried = f" after {robust.round_retries} retries" if robust.round_retries else ""
    error = UserError(f"federation.robust.min_clients: round {round_index} got {usable} usable updates of {sampled} sampled "
                      f"clients{retried}, fewer than the {needed} it needs ({reasons})")
    error.__cause__ = draws.raised[0] if draws.raised else None
    return error
