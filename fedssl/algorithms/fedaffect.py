"""Federated self-supervised pretraining and few-shot learning: FedAffect, FedU-style
FedAvg of encoders, FedEMA.

FedAffect (Shome and Kar, "FedAffect: Few-shot federated learning for facial
expression recognition", ICCV Workshops 2021): devices hold many unlabeled faces and a
few labeled ones, so the feature extractor is learned by federated self-supervised
learning on the unlabeled faces, and the classifier by federated training on the few
labeled ones (`data.labels.mode: client`, `data.labels.per_class` = k). Here the two
stages follow each other (`schedule: sequential`: `pretrain_rounds` rounds of
self-supervision, then few-shot rounds) or, after the pretraining rounds, share every
round (`schedule: interleaved`).

The server averages every shared array (FedAvg of encoders, as FedU, Zhuang et al.,
ICCV 2021, does of its online networks), so `federation.robust.aggregator` and
`privacy.mechanism` apply. With `update: fedema`, clients apply FedEMA's
divergence-aware update (Zhuang, Wen and Zhang, "Divergence-aware Federated
Self-Supervised Learning", ICLR 2022): each moves its previous online network toward
the received global one at the rate mu = min(lambda ||W_g - W_k||, 1)
(`fedssl.ssl.selfsup`). BYOL's target network and FedEMA's previous online network
stay with each client, in its state.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field, replace

from torch import nn

from fedssl.algorithms.capabilities import Capabilities
from fedssl.config.schema import ALGORITHM_SECTIONS, RecipeConfig
from fedssl.config.validate import check_choice, require
from fedssl.errors import UserError
from fedssl.algorithms.aggregate import ServerState
from fedssl.algorithms.base import ALGORITHMS, SMOKE_FEW_LABELS_PER_CLIENT, LocalClient
from fedssl.algorithms.fedavg import FedAvg
from fedssl.learners.personal import personal_arrays
from fedssl.learners.selfsup import HEADS, METHODS, SelfSupervisedLearner
from fedssl.messages import Arrays, Scalar

SCHEDULES = ("sequential", "interleaved")
UPDATES = ("fedavg", "fedema")
PERSONAL_KEY = "algorithm.selfsup.personal"


@ALGORITHM_SECTIONS.register("selfsup")
@dataclass
class SelfSupConfig:
    """`algorithm.selfsup`: fedaffect's self-supervised and few-shot stages."""

    method: str = "byol"  # fedaffect: the self-supervised learner: simclr (NT-Xent) | byol (online/target networks)
    update: str = "fedavg"  # fedaffect: how a client starts its round: fedavg (from the global model) | fedema (FedEMA's divergence-aware EMA of its last online network toward the global one)
    ema_lambda: float = 0.0  # fedema: lambda in mu = min(lambda * ||W_g - W_k||, 1); 0: the paper's autoscaler, lambda = ema_tau / ||W_g - W_k|| at a client's first return
    ema_tau: float = 0.7  # fedema: the autoscaler's expected first rate tau
    pretrain_rounds: int = 10  # fedaffect: rounds of self-supervision alone before the few-shot stage (>= federation.rounds: self-supervision only)
    schedule: str = "sequential"  # fedaffect: after pretrain_rounds, sequential (few-shot rounds: the classifier on the labeled images) | interleaved (both losses in every round, FedAffect's alternation)
    finetune_encoder: bool = False  # fedaffect: the few-shot stage trains the encoder too, not only the classifier
    fewshot_steps: int = 0  # fedaffect: SGD steps of a few-shot round (0: train.local_epochs passes over the labeled images, or train.local_steps)
    temperature: float = 0.5  # simclr: NT-Xent temperature
    target_momentum: float = 0.99  # byol: base EMA rate of the target network, raised to 1 over each round (cosine)
    proj_dim: int = 64  # output width of the projection and prediction heads
    hidden_dim: int = 256  # hidden width of the projection and prediction heads
    personal: list[str] = field(default_factory=list)  # fnmatch patterns of arrays that stay on the client, e.g. ssl_predictor.* (the heads are ssl_projector.* and ssl_predictor.*; the model's arrays by state_dict name)

    def check(self, cfg: RecipeConfig) -> None:
        check_choice(self.method, METHODS, "algorithm.selfsup.method")
        check_choice(self.update, UPDATES, "algorithm.selfsup.update")
        check_choice(self.schedule, SCHEDULES, "algorithm.selfsup.schedule")
        require(self.ema_lambda >= 0, "algorithm.selfsup.ema_lambda", f"must be >= 0, got {self.ema_lambda}")
        require(0 < self.ema_tau <= 1, "algorithm.selfsup.ema_tau", f"must be in (0, 1], got {self.ema_tau}")
        require(self.pretrain_rounds >= 0, "algorithm.selfsup.pretrain_rounds", f"must be >= 0, got {self.pretrain_rounds}")
        require(self.fewshot_steps >= 0, "algorithm.selfsup.fewshot_steps", f"must be >= 0, got {self.fewshot_steps}")
        require(self.temperature > 0, "algorithm.selfsup.temperature", f"must be > 0, got {self.temperature}")
        require(0 <= self.target_momentum <= 1, "algorithm.selfsup.target_momentum",
                f"must be in [0, 1], got {self.target_momentum}")
        require(self.proj_dim > 0 and self.hidden_dim > 0, "algorithm.selfsup.proj_dim",
                f"the heads' widths must be > 0, got {self.proj_dim} and {self.hidden_dim}")


def stage(round_index: int, cfg: SelfSupConfig) -> str:
    """The round's stage: "ssl" for the first `pretrain_rounds` rounds, then "fewshot"
    (sequential) or "both" (interleaved)."""
    if round_index <= cfg.pretrain_rounds:
        return "ssl"
    return "fewshot" if cfg.schedule == "sequential" else "both"


def select(names: list[str], patterns: list[str]) -> list[str]:
    """The `names` matching any pattern; a pattern that matches none is a user error."""
    for pattern in patterns:
        if not fnmatch.filter(names, pattern):
            raise UserError(f"{PERSONAL_KEY}: {pattern!r} matches no array (e.g. {', '.join(names[:3])}, ...)")
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


@ALGORITHMS.register("fedaffect")
class FedAffect(FedAvg):
    """Federated self-supervised pretraining (SimCLR or BYOL; FedAvg of encoders or
    FedEMA) and FedAffect's few-shot classifier stage (Shome and Kar, ICCV-W 2021).

    The evaluated and exported model is the classifier on the learned encoder; the
    projection and prediction heads travel beside it but are neither evaluated nor
    exported (`global_weights`).
    """

    # both stages in two rounds: a self-supervised round, then a few-shot one on the clients' labels
    smoke = (*SMOKE_FEW_LABELS_PER_CLIENT, "algorithm.selfsup.pretrain_rounds=1")

    def __init__(self, cfg: RecipeConfig):
        super().__init__(cfg)
        self.section: SelfSupConfig = cfg.algorithm.selfsup
        self.personal: list[str] = []
        self.initial: Arrays = {}

    @property
    def capabilities(self) -> Capabilities:
        personal = bool(self.section.personal)
        keeps = self.section.method == "byol" or self.section.update == "fedema" or personal
        return replace(FedAvg.capabilities, personalized=personal, keeps_client_state=keeps)

    def make_learner(self, model: nn.Module) -> SelfSupervisedLearner:
        s = self.section
        learner = SelfSupervisedLearner(model, self.cfg.train, s.method, s.proj_dim, s.hidden_dim, s.temperature,
                                        s.target_momentum, s.finetune_encoder, s.update == "fedema", s.ema_lambda,
                                        s.ema_tau, s.fewshot_steps)
        names = list(learner.views())
        self.personal = learner.personal = select(names, s.personal)
        if len(self.personal) == len(names):
            raise UserError(f"{PERSONAL_KEY}: every array would stay on the client and nothing would be shared")
        # The model's personal arrays at their initialization (made from the run seed):
        # what the global model holds in their place, as FedPer's.
        self.initial = learner.arrays([n for n in self.personal if not n.startswith(HEADS)])
        return learner

    def shared_names(self, learner: SelfSupervisedLearner) -> list[str]:
        personal = set(self.personal)
        return [n for n in learner.views() if n not in personal]

    def client_config(self, round_index: int) -> dict[str, Scalar]:
        return {"stage": stage(round_index, self.section)}

    def global_weights(self, state: ServerState) -> Arrays:
        """The model's arrays (the heads left out), personal ones at their initialization."""
        return {n: v for n, v in (state.params | self.initial).items() if not n.startswith(HEADS)}

    def personal_weights(self, global_weights: Arrays, client: LocalClient) -> Arrays:
        return global_weights | {n: v for n, v in personal_arrays(client.state).items() if n in global_weights}
