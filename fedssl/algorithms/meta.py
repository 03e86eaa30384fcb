"""Meta-learning for personalization: Per-FedAvg and Reptile.

Both learn one global initialization that a client turns into its own model with a
few SGD steps on its local training data; at evaluation each client does exactly
that (`algorithm.meta.adapt_steps` steps, batches of `train.batch_size`) and is
scored on its own local test split. The server side is FedAvg's averaging.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

from fedssl.config.schema import ALGORITHM_SECTIONS, RecipeConfig
from fedssl.config.validate import check_choice, require

from fedssl.algorithms.base import ALGORITHMS
from fedssl.algorithms.fedavg import FedAvg
from fedssl.messages import Arrays
from fedssl.algorithms.base import LocalClient
from fedssl.learners.maml import adapt_arrays
from fedssl.learners.perfedavg import PerFedAvgLearner
from fedssl.learners.supervised import SupervisedLearner

META_VARIANTS = ("fo", "hf")


@ALGORITHM_SECTIONS.register("meta")
@dataclass
class MetaConfig:
    """`algorithm.meta`: how Per-FedAvg meta-trains and how clients adapt."""

    variant: str = "fo"  # perfedavg: fo (first-order) | hf (Hessian-free, finite-difference Hessian-vector product)
    inner_lr: float = 0.01  # perfedavg: alpha, the inner (adaptation) step size; train.lr is the outer step beta
    hf_delta: float = 0.001  # perfedavg hf: delta of the finite-difference Hessian-vector product
    adapt_steps: int = 1  # perfedavg/reptile: SGD steps on a client's labeled data that adapt the global model before its personal evaluation

    def check(self, cfg: RecipeConfig) -> None:
        check_choice(self.variant, META_VARIANTS, "algorithm.meta.variant")
        require(self.inner_lr > 0, "algorithm.meta.inner_lr", f"must be > 0, got {self.inner_lr}")
        require(self.hf_delta > 0, "algorithm.meta.hf_delta", f"must be > 0, got {self.hf_delta}")
        require(self.adapt_steps >= 0, "algorithm.meta.adapt_steps", f"must be >= 0, got {self.adapt_steps}")


class MetaLearned(FedAvg):
    """FedAvg whose clients personalize by adapting the global model at `adapt_lr`."""

    capabilities = replace(FedAvg.capabilities, personalized=True, keeps_client_state=True)

    def __init__(self, cfg):
        super().__init__(cfg)
        self.model: nn.Module | None = None  # the architecture adaptation runs on (set by make_learner)

    @property
    def adapt_lr(self) -> float:
        raise NotImplementedError

    def personal_weights(self, global_weights: Arrays, client: LocalClient) -> Arrays:
        steps = self.cfg.algorithm.meta.adapt_steps
        return adapt_arrays(self.model, global_weights, client.batches(steps), self.adapt_lr)

    def unseen_weights(self, global_weights: Arrays, client: LocalClient, fine_tune_head) -> Arrays:
        """A new person adapts as every client is personalized: the meta-learned step."""
        return self.personal_weights(global_weights, client)


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
