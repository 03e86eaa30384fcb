"""What an algorithm needs from a round and allows around it, in one place.

Each algorithm declares a frozen `Capabilities`; `check_compatible` is the one
place a recipe is refused for asking an algorithm for something it cannot do
(a robust aggregator, DP, codecs, a lossy link, the Flower backend, ...), each
refusal one line naming the key. The engine reads the same description to decide
how a round runs (averaged as the updates come, or held whole).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedssl.config.schema import RecipeConfig
from fedssl.config.validate import codec_stages, lossy
from fedssl.errors import UserError


@dataclass(frozen=True)
class Capabilities:
    """What an algorithm is, as the round engine and the recipe checks see it.

    Attributes:
        averages_updates: its `aggregate` is `robust.combine` of the updates followed
            by a server step, so `federation.robust.aggregator` can replace the average and
            `privacy.mechanism` can hand it one private update for the cohort's.
        dense_updates: every update holds each shared array densely (the FedAvg
            family); otherwise an update may send sparse deltas and leave unchanged
            arrays out (FedMatch), which `engine.checks.check_update` allows.
        personalized: a client's personalized model (`personal_weights`) can differ
            from the global model.
        keeps_client_state: clients keep state between rounds (their learner's
            `end_round`), which a backend holding it on the clients' side cannot
            restore on resume.
        counts_local_steps: `aggregate` reads each update's `local_steps` metric
            (FedNova's tau_i), which the server adds from the steps it asked for.
        asynchronous: the algorithm brings its own round (`Algorithm.round`) on
            simulated time instead of a synchronous cohort (FedBuff).
        server_momentum: its server step takes `algorithm.server_momentum`.
        reads_each_update: why its server needs each client's update on its own
            rather than their sum (FedMatch's per-client models, FedMA's matching,
            MOCHA's task relations), or "" when a sum would do. Secure aggregation,
            where the server sees only a sum, refuses what is named here.
    """

    averages_updates: bool = False
    dense_updates: bool = False
    personalized: bool = False
    keeps_client_state: bool = False
    counts_local_steps: bool = False
    asynchronous: bool = False
    server_momentum: bool = True
    reads_each_update: str = ""

    @property
    def linear(self) -> bool:
        """Whether the server averages dense updates, so that an update may be
        compressed, partly delivered or made private coordinate by coordinate."""
        return self.averages_updates and self.dense_updates


def check_compatible(cfg: RecipeConfig, can: Capabilities, resume_on_nodes: bool = False) -> None:
    """Refuse, in one line naming the key, a recipe that asks `algorithm.name` (whose
    capabilities are `can`) for what it cannot do. `resume_on_nodes`: the run
    continues from a checkpoint with its clients on Flower nodes, which hold what
    the clients keep."""
    name, fed = cfg.algorithm.name, cfg.federation
    codecs = bool(fed.uplink.codecs or fed.downlink.codecs)

    def refuse(key: str, why: str) -> None:
        raise UserError(f"{key}: {why}")

    if fed.robust.aggregator != "mean" and not can.averages_updates:
        refuse("federation.robust.aggregator", f"{fed.robust.aggregator} is not available for algorithm.name={name}, whose server "
               "does not average full client weights")
    if cfg.privacy.mechanism != "none" and not can.linear:
        refuse("privacy.mechanism", f"{cfg.privacy.mechanism} is not available for algorithm.name={name}: its server "
               "does not average full client weights (e.g. FedMatch's sparse sigma/psi deltas, and the per-client "
               "models it keeps and sends to other clients as helpers)")
    if codecs and not (can.linear or can.asynchronous and can.dense_updates):
        refuse("federation.uplink.codecs", f"algorithm.name={name} does not average dense updates (FedMatch sends "
               "sparse deltas of its own decomposition); codecs apply to the FedAvg family and the personalized "
               "algorithms")
    if lossy(fed.uplink.channel) and can.asynchronous and fed.uplink.channel.strategy == "mean":
        refuse("federation.uplink.channel.strategy", f"algorithm.name={name} applies each arrival on its own "
               "(FedBuff); a coordinate's mean over the clients it reached needs a synchronous cohort: use drop or fill")
    if lossy(fed.uplink.channel) and not (can.linear or can.asynchronous and can.dense_updates):
        refuse("federation.uplink.channel", f"algorithm.name={name} does not average dense updates, so a partly "
               "delivered update cannot be placed coordinate by coordinate")
    if can.asynchronous:
        if fed.backend != "inprocess":  # checked before a Flower simulation starts
            refuse("federation.backend", f"{name} runs on the inprocess backend only, got {fed.backend} (its clients "
                   "start one at a time on simulated time; fedssl's Flower rounds are synchronous cohorts)")
        if fed.system.policy != "wait_all":
            refuse("federation.system.policy", f"{name} has no synchronous rounds to cut short; use wait_all, got "
                   f"{fed.system.policy}")
    if cfg.algorithm.server_momentum != 0 and not can.server_momentum:
        refuse("algorithm.server_momentum", f"{name} applies its server step without momentum (0)")
    if resume_on_nodes:
        if can.keeps_client_state:
            refuse("cannot resume", f"with algorithm.name={name} (and its algorithm.ssl settings) each client keeps "
                   "state between rounds on its Flower node, which the server's checkpoint does not hold; start a new "
                   "run, or run it with federation.backend=inprocess")
        if any(not stage.stateless for stage in codec_stages(fed.uplink.codecs, "federation.uplink.codecs")):
            refuse("cannot resume", "with error feedback (federation.uplink.codecs) each client keeps its residual on "
                   "its Flower node, which the server's checkpoint does not hold; start a new run, or run it with "
                   "federation.backend=inprocess")
