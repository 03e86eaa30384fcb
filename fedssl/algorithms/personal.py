"""Personalization layers and Ditto: FedPer, FedRep, FedBN, Ditto.

The server side of each is FedAvg over what is shared; what differs is which arrays
stay on the clients (named by `algorithm.personal.patterns`, by default the
classifier or the normalization layers) and how clients train. With
`algorithm.personal.ssl: true` clients learn with FixMatch from their unlabeled
data as well, so labeled and unlabeled clients personalize together.

The "global model" these algorithms evaluate on the server's test set has no
trained personal layers (they never leave the clients): it is the shared arrays
with the personal layers' initial weights. Each client's personalized model (the
shared arrays with its own personal ones) is what `personal_acc` scores.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace

from torch import nn

from fedssl.config.schema import ALGORITHM_SECTIONS, RecipeConfig
from fedssl.config.validate import require
from fedssl.errors import UserError
from fedssl.algorithms.aggregate import ServerState
from fedssl.algorithms.base import ALGORITHMS, Algorithm
from fedssl.algorithms.fedavg import FedAvg
from fedssl.messages import Arrays
from fedssl.algorithms.base import LocalClient
from fedssl.learners.base import FederatedLearner
from fedssl.learners.fixmatch import FixMatchLearner
from fedssl.learners.personal import DittoLearner, FedRepLearner, PersonalLayersLearner, personal_arrays
from fedssl.learners.supervised import SupervisedLearner
from fedssl.models.personal import PATTERNS_KEY, head_array_names, norm_array_names, select_arrays


def readers(base: type[Algorithm]) -> list[str]:
    """The registered algorithms built on `base` (those that read a key it reads)."""
    return [name for name in ALGORITHMS.names() if issubclass(ALGORITHMS.get(name), base)]


@ALGORITHM_SECTIONS.register("personal")
@dataclass
class PersonalConfig:
    """`algorithm.personal`: which layers stay on the clients, and how they train."""

    patterns: list[str] = field(default_factory=list)  # fedper/fedrep/fedbn: fnmatch patterns of the state_dict arrays that stay on the client (default: fedper/fedrep the classifier, fedbn the normalization layers)
    head_epochs: int = 1  # fedrep: epochs training the head (body frozen) before train.local_epochs training the body (head frozen)
    lam: float = 0.1  # ditto: lambda, the pull of each client's personal model toward the global one
    ssl: bool = False  # fedper/fedrep/fedbn/ditto: clients also learn from unlabeled data with FixMatch (algorithm.ssl)

    def check(self, cfg: RecipeConfig) -> None:
        """Values in range, and switches set only where the algorithm reads them (a
        switch that does nothing would hide a mistake)."""
        name = cfg.algorithm.name
        require(self.head_epochs >= 0, "algorithm.personal.head_epochs", f"must be >= 0, got {self.head_epochs}")
        require(self.lam >= 0, "algorithm.personal.lam", f"must be >= 0, got {self.lam}")
        by_pattern = readers(PersonalLayers)
        require(not self.patterns or name in by_pattern, "algorithm.personal.patterns",
                f"only {', '.join(by_pattern)} keep layers by pattern; algorithm.name is {name!r}")
        with_ssl = readers(Personalized)
        require(not self.ssl or name in with_ssl, "algorithm.personal.ssl",
                f"only {', '.join(with_ssl)} take it (fixmatch is FedAvg with FixMatch); algorithm.name is {name!r}")


class Personalized(FedAvg):
    """FedAvg's aggregation; a client's personalized model is the global one with the
    personal arrays it kept."""

    capabilities = replace(FedAvg.capabilities, personalized=True, keeps_client_state=True)

    def base_learner(self, model: nn.Module, proximal_mu: float) -> SupervisedLearner:
        """The client's ordinary learner: supervised, or FixMatch with `personal.ssl`."""
        algo = self.cfg.algorithm
        if algo.personal.ssl:
            return FixMatchLearner(model, self.cfg.train, algo.ssl, model.num_classes, proximal_mu)
        return SupervisedLearner(model, self.cfg.train, proximal_mu)

    def personal_weights(self, global_weights: Arrays, client: LocalClient) -> Arrays:
        return global_weights | personal_arrays(client.state)


class PersonalLayers(Personalized):
    """Base of FedPer, FedRep and FedBN: the arrays matching `algorithm.personal.patterns`
    (default: `default_personal`) are trained on the client and never sent."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.initial: Arrays = {}

    def default_personal(self, model: nn.Module) -> list[str]:
        return head_array_names(model)

    def personal_names(self, model: nn.Module) -> list[str]:
        patterns = self.cfg.algorithm.personal.patterns
        names = select_arrays(model, patterns) if patterns else self.default_personal(model)
        if not names:
            raise UserError(f"{PATTERNS_KEY}: {self.cfg.algorithm.name} found no personal layers in "
                            f"{type(model).__name__}; name them by pattern")
        if len(names) == len(model.state_dict()):
            raise UserError(f"{PATTERNS_KEY}: every array of {type(model).__name__} would stay on the client "
                            "and nothing would be shared")
        return names

    def wrap(self, inner: FederatedLearner, personal: list[str]) -> PersonalLayersLearner:
        return PersonalLayersLearner(inner, personal)

    def make_learner(self, model: nn.Module) -> PersonalLayersLearner:
        learner = self.wrap(self.base_learner(model, self.cfg.algorithm.proximal_mu), self.personal_names(model))
        self.initial = learner.initial  # fixed: the model's initialization, made from the run seed
        return learner

    def shared_names(self, learner: PersonalLayersLearner) -> list[str]:
        personal = set(learner.personal)
        return [name for name in learner.model.state_dict() if name not in personal]

    def global_weights(self, state: ServerState) -> Arrays:
        """The shared arrays, with the personal layers at their initialization."""
        return state.params | self.initial


@ALGORITHMS.register("fedper")
class FedPer(PersonalLayers):
    """FedPer (Arivazhagan et al., "Federated Learning with Personalization Layers",
    arXiv:1912.00818, 2019): clients train the whole model; the base layers are
    averaged, the personalization layers (the classifier, by default) stay local."""


@ALGORITHMS.register("fedrep")
class FedRep(PersonalLayers):
    """FedRep (Collins, Hassani, Mokhtari and Shakkottai, "Exploiting Shared
    Representations for Personalized Federated Learning", ICML 2021): each round a
    client first fits its local head to the received representation
    (`algorithm.personal.head_epochs` epochs, body frozen), then updates the body
    (`train.local_epochs`, head frozen); only the body is averaged."""

    def wrap(self, inner: FederatedLearner, personal: list[str]) -> FedRepLearner:
        train = self.cfg.train
        return FedRepLearner(inner, personal, self.cfg.algorithm.personal.head_epochs, train.local_epochs,
                             train.local_steps)


@ALGORITHMS.register("fedbn")
class FedBN(PersonalLayers):
    """FedBN (Li, Jiang, Zhang, Kamp and Dou, "FedBN: Federated Learning on Non-IID
    Features via Local Batch Normalization", ICLR 2021): every array of the
    normalization layers (affine weights and running statistics) stays local; the
    rest is averaged. Use a model with normalization layers (`fedavg_cnn_bn`)."""

    smoke = ("model.name=fedavg_cnn_bn",)  # the tests' model has no normalization layers, which it refuses

    def default_personal(self, model: nn.Module) -> list[str]:
        names = norm_array_names(model)
        if not names:
            raise UserError(f"model.name: fedbn keeps normalization layers local, and {self.cfg.model.name} has "
                            f"none; use a model with them (e.g. fedavg_cnn_bn) or set {PATTERNS_KEY}")
        return names


@ALGORITHMS.register("ditto")
class Ditto(Personalized):
    """Ditto (Li, Hu, Beirami and Smith, "Ditto: Fair and Robust Federated Learning
    Through Personalization", ICML 2021): the global model is trained as in FedAvg,
    and each client also trains a personal model v_k on
    F_k(v_k) + lambda/2 ||v_k - w||^2 (`algorithm.personal.lam`), which never leaves it."""

    def make_learner(self, model: nn.Module) -> DittoLearner:
        algo = self.cfg.algorithm
        inner = self.base_learner(model, algo.proximal_mu)
        return DittoLearner(inner, self.base_learner(copy.deepcopy(model), algo.personal.lam))
