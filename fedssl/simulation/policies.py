"""Round policies under system heterogeneity: who a synchronous round waits for.

Given each sampled client's simulated `Work` (fedssl.simulation.simtime) the server
plans the round before anyone trains (`plan_round`, pure):

- `wait_all`: every online client; the round lasts as long as the slowest.
- `deadline`: clients that would finish after `deadline` are dropped (late). They
  are not trained: their update would be thrown away.
- `overselect`: `overselect` more clients are sampled and the first
  clients_per_round to finish are kept (Bonawitz et al., "Towards Federated
  Learning at Scale: System Design", MLSys 2019).
- `partial`: each client runs as many local steps as fit the deadline (FedProx's
  variable local work, Li et al. MLSys 2020); one that cannot fit a single step
  is late. The step budget travels in the payload's config (`STEP_BUDGET`).

`SystemHeterogeneity` applies a plan to the engine's payloads and reports the
round's simulated time and who was late, partial or offline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Mapping

from fedssl.config.schema import RecipeConfig, SystemConfig
from fedssl.data.federated import FederatedData
from fedssl.errors import UserError
from fedssl.inprocess.client_data import STEP_BUDGET, round_steps
from fedssl.simulation.profiles import DeviceProfile, build_profiles, is_online
from fedssl.simulation.simtime import Work, client_work
from fedssl.learners.base import FederatedLearner
from fedssl.messages import Payload, Update, array_bytes

POLICIES = ("wait_all", "deadline", "overselect", "partial")


@dataclass(frozen=True)
class RoundPlan:
    """Who trains this round and for how many steps, and who does not.

    Attributes:
        steps: client -> local steps it runs (kept clients only).
        late: clients dropped because they would miss the deadline (or, under
            over-selection, finish after the first clients_per_round).
        offline: sampled clients that were not online.
        partial: kept clients that run fewer steps than their budget.
        deadline: when the server stops waiting, or None.
    """

    steps: dict[int, int]
    late: list[int] = field(default_factory=list)
    offline: list[int] = field(default_factory=list)
    partial: list[int] = field(default_factory=list)
    deadline: float | None = None


def plan_round(policy: str, work: Mapping[int, Work], offline: list[int], deadline: float, keep: int) -> RoundPlan:
    """The round's plan for the online clients' `work` (see the module docstring);
    `keep`: how many clients over-selection keeps."""
    if policy == "wait_all":
        return RoundPlan({c: w.steps for c, w in work.items()}, offline=offline)
    if policy == "deadline":
        kept = {c: w.steps for c, w in work.items() if w.seconds() <= deadline}
        return RoundPlan(kept, late=[c for c in work if c not in kept], offline=offline, deadline=deadline)
    if policy == "overselect":
        first = sorted(work, key=lambda c: (work[c].seconds(), c))[:keep]
        return RoundPlan({c: work[c].steps for c in sorted(first)}, late=[c for c in work if c not in first],
                         offline=offline)
    if policy == "partial":
        fits = {c: w.steps_within(deadline) for c, w in work.items()}
        kept = {c: s for c, s in fits.items() if s > 0}
        return RoundPlan(kept, late=[c for c in work if c not in kept], offline=offline,
                         partial=[c for c, s in kept.items() if s < work[c].steps], deadline=deadline)
    raise UserError(f"federation.system.policy: must be one of {' | '.join(POLICIES)}, got {policy!r}")


def round_seconds(plan: RoundPlan, work: Mapping[int, Work], upload_bytes: Mapping[int, int] | None = None,
                  uplinks: Mapping[int, float] | None = None) -> float:
    """The round's simulated seconds: the slowest kept client's download, steps and
    upload (the update's real size where `upload_bytes` gives it), or the deadline
    where the server waited for someone who never came."""
    finish = 0.0
    for c, steps in plan.steps.items():
        seconds = work[c].seconds(steps)
        if upload_bytes is not None and c in upload_bytes:
            seconds += upload_bytes[c] / uplinks[c] - work[c].upload
        finish = max(finish, seconds)
    if plan.late and plan.deadline is not None:
        return max(finish, plan.deadline)
    return finish


def check_system(cfg: RecipeConfig) -> None:
    system = cfg.federation.system
    if system.policy not in POLICIES:
        raise UserError(f"federation.system.policy: must be one of {' | '.join(POLICIES)}, got {system.policy!r}")
    if system.policy != "wait_all" and system.profile == "none":
        raise UserError(f"federation.system.policy: {system.policy} needs device profiles "
                        "(federation.system.profile: uniform | mobile | trace)")
    if system.policy in ("deadline", "partial") and not (math.isfinite(system.deadline) and system.deadline > 0):
        raise UserError(f"federation.system.deadline: {system.policy} needs a deadline > 0 seconds, got {system.deadline}")
    if not (math.isfinite(system.overselect) and system.overselect >= 0):
        raise UserError(f"federation.system.overselect: must be >= 0, got {system.overselect}")
    if system.online < 1 and system.profile in ("uniform", "mobile") and cfg.privacy.mechanism != "none":
        raise UserError(f"federation.system.online: {system.online} < 1 cannot be combined with privacy.mechanism="
                        f"{cfg.privacy.mechanism} (the accountant assumes Poisson-sampled clients all take part)")
    if system.policy != "wait_all" and cfg.privacy.mechanism != "none":
        # The accountant assumes each client takes part with the sampling rate; who
        # is dropped for being slow is not independent of the client.
        raise UserError(f"federation.system.policy: {system.policy} cannot be combined with privacy.mechanism="
                        f"{cfg.privacy.mechanism} (the accountant assumes Poisson-sampled clients all take part)")


@dataclass
class SystemHeterogeneity:
    """The run's device profiles and round policy, as the round engine applies them.

    With `profile: none` it only counts each client's local steps (for FedNova)
    and reports no simulated time."""

    cfg: SystemConfig
    seed: int
    profiles: dict[int, DeviceProfile]
    steps: dict[int, int]  # each client's full local-step budget
    samples_per_step: dict[int, int]
    keep: int  # clients_per_round: how many over-selection keeps

    @classmethod
    def build(cls, cfg: RecipeConfig, data: FederatedData, learner: FederatedLearner, keep: int) -> SystemHeterogeneity:
        check_system(cfg)
        profiles = build_profiles(cfg.federation.system, cfg.federation.clients, cfg.seed)
        steps, samples = {}, {}
        for client in data.clients:
            unlabeled = len(client.unlabeled) if learner.uses_unlabeled else 0
            unlabeled_batch = cfg.train.batch_size * cfg.algorithm.ssl.unlabeled_ratio if unlabeled else 0
            budget = round_steps(len(client.labeled), unlabeled, cfg.train, unlabeled_batch)
            steps[client.client_id] = learner.round_steps(budget)
            samples[client.client_id] = (cfg.train.batch_size if len(client.labeled) else 0) + unlabeled_batch
        return cls(cfg.federation.system, cfg.seed, profiles, steps, samples, keep)

    @property
    def timed(self) -> bool:
        return bool(self.profiles)

    def sample_count(self, count: int) -> int:
        """How many clients a round samples: more under over-selection."""
        if self.cfg.policy != "overselect":
            return count
        return math.ceil(count * (1 + self.cfg.overselect))

    def work(self, client_id: int, payload: Payload) -> Work:
        # the upload is estimated as dense shared arrays; `finish` uses the real update's size
        return client_work(self.profiles[client_id], payload.num_bytes, array_bytes(payload.arrays),
                           self.steps[client_id], self.samples_per_step[client_id])

    def plan(self, round_index: int, attempt: int, payloads: dict[int, Payload]) -> tuple[RoundPlan, dict[int, Payload]]:
        """The round's plan, and the payloads of the clients it keeps (a partial
        client's carries its step budget)."""
        if not self.timed:
            return RoundPlan({c: self.steps[c] for c in payloads}), payloads
        online = [c for c in payloads if is_online(self.profiles[c], self.seed, round_index, c, attempt)]
        work = {c: self.work(c, payloads[c]) for c in online}
        plan = plan_round(self.cfg.policy, work, [c for c in payloads if c not in work], self.cfg.deadline, self.keep)
        kept = {}
        for c, steps in plan.steps.items():
            payload = payloads[c]
            if steps < self.steps[c]:
                payload = replace(payload, config=payload.config | {STEP_BUDGET: steps})
            kept[c] = payload
        return plan, kept

    def annotate(self, plan: RoundPlan, update: Update) -> Update:
        """The update with the local steps its client was asked for, as the server
        counts them (FedNova's tau_i); never a client's own claim."""
        return replace(update, metrics=update.metrics | {"local_steps": float(plan.steps[update.client_id])})

    def left_out(self, plans: list[tuple[RoundPlan, dict[int, Payload]]]) -> str:
        """Who the round's plans left out and why, for an error message."""
        late = sorted({c for plan, _ in plans for c in plan.late})
        offline = sorted({c for plan, _ in plans for c in plan.offline})
        return (f"late for federation.system.policy={self.cfg.policy} (deadline {self.cfg.deadline} s): {late}, "
                f"offline: {offline}")

    def finish(self, plans: list[tuple[RoundPlan, dict[int, Payload]]], received: Mapping[int, int]) -> dict[str, float]:
        """The round's simulated seconds and counts (over every draw of a retried round)."""
        if not self.timed:
            return {}
        seconds, late, offline, partial = 0.0, 0, 0, 0
        for plan, payloads in plans:
            work = {c: self.work(c, payloads[c]) for c in plan.steps}
            uplinks = {c: self.profiles[c].uplink for c in plan.steps}
            seconds += round_seconds(plan, work, {c: b for c, b in received.items() if c in plan.steps}, uplinks)
            late, offline, partial = late + len(plan.late), offline + len(plan.offline), partial + len(plan.partial)
        return {"sim_seconds": seconds, "late_clients": late, "offline_clients": offline, "partial_clients": partial}
