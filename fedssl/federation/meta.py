"""Meta-learning for personalization: Per-FedAvg and Reptile.

Both learn one global initialization that a client turns into its own model with a
few SGD steps on its local training data; at evaluation each client does exactly
that (`algorithm.meta.adapt_steps` steps, batches of `train.batch_size`) and is
scored on its own local test split. The server side is FedAvg's averaging.
"""

from __future__ import annotations

from torch import nn

from fedssl.federation.algorithm import ALGORITHMS
from fedssl.federation.fedavg import FedAvg
from fedssl.federation.messages import Arrays
from fedssl.federation.personal_eval import LocalClient
from fedssl.learners.maml import adapt_arrays
from fedssl.learners.perfedavg import PerFedAvgLearner
from fedssl.learners.supervised import SupervisedLearner


class MetaLearned(FedAvg):
    """FedAvg whose clients personalize by adapting the global model at `adapt_lr`."""

    personalized = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.model: nn.Module | None = None  # the architecture adaptation runs on (set by make_learner)

    @property
    def adapt_lr(self) -> float:
        raise NotImplementedError

    def personal_weights(self, global_weights: Arrays, client: LocalClient) -> Arrays:
        steps = self.cfg.algorithm.meta.adapt_steps
        return adapt_arrays(self.model, global_weights, client.batches(steps), self.adapt_lr)


@ALGORITHMS.register("perfedavg")
class PerFedAvg(MetaLearned):
    """Per-FedAvg (Fallah, Mokhtari and Ozdaglar, "Personalized Federated Learning with
    Theoretical Guarantees: A Model-Agnostic Meta-Learning Approach", NeurIPS 2020):
    FedAvg on the MAML objective F_i(w - alpha grad F_i(w)), first-order (`fo`) or
    Hessian-free (`hf`), per `algorithm.meta.variant`. Clients adapt at alpha
    (`algorithm.meta.inner_lr`), the step the global model was meta-trained for."""

    def make_learner(self, model: nn.Module) -> PerFedAvgLearner:
        self.model = model
        return PerFedAvgLearner(model, self.cfg.train, self.cfg.algorithm.meta)

    @property
    def adapt_lr(self) -> float:
        return self.cfg.algorithm.meta.inner_lr


@ALGORITHMS.register("reptile")
class Reptile(MetaLearned):
    """Reptile (Nichol, Achiam and Schulman, "On First-Order Meta-Learning Algorithms",
    arXiv:1803.02999, 2018) across clients, as Jiang et al. ("Improving Federated
    Learning Personalization via Model Agnostic Meta Learning", 2019) describe it:
    each client runs k steps of SGD from the global weights (its task's inner loop,
    `train.*`), and the server moves the global weights toward the clients' average
    by epsilon (`algorithm.server_lr`; at 1 the server step is FedAvg's). Clients
    adapt at the inner loop's rate, `train.lr`."""

    def make_learner(self, model: nn.Module) -> SupervisedLearner:
        self.model = model
        return SupervisedLearner(model, self.cfg.train, self.cfg.algorithm.proximal_mu)

    @property
    def adapt_lr(self) -> float:
        return self.cfg.train.lr
