"""MOCHA: federated multi-task learning (Smith, Chiang, Sanjabi and Talwalkar,
"Federated Multi-Task Learning", NeurIPS 2017, arXiv:1705.10467).

Every client is a task t with weights w_t of its own, the rows of W. MOCHA
minimizes

    sum_t F_t(w_t) + lambda/2 tr(W^T Omega^-1 W)     (W: tasks as rows here)

over W and the task-relationship matrix Omega (positive definite, trace 1), by
alternating: clients approximately solve their local subproblems with Omega fixed
(`fedssl.learners.mocha` says what client t's part of the coupling is), and the
server updates Omega in closed form,

    Omega = (W W^T)^(1/2) / tr((W W^T)^(1/2)),

every `algorithm.mocha.omega_every` rounds (the paper's H federated iterations per
Omega update), starting from Omega = I/m (m tasks, as the paper's code starts). Each client does
its own amount of work per round: a fraction of the recipe's step budget drawn
uniformly in [work_min, work_max] from (seed, round, client), as the paper's
systems-heterogeneity experiments draw each device's local iterations (its code:
0.1 to 1.0 of a local epoch).

What we follow and where we differ, and why:

- The coupling and its closed form follow the authors' code (github:gingsmith/fmtl,
  `opt/run_mocha.m`): Sigma = sqrtm(W^T W) / trace, W's Gram matrix with its
  eigenvalues floored at 1e-7 first (`EIGEN_FLOOR`), the coupling lambda/2
  tr(W Sigma^-1 W^T) (`compute_primal.m`). The brief and the paper call that Sigma
  Omega; so do we.
- The paper's clients solve a dual subproblem with SDCA (convex losses); deep
  models have no useful dual, so clients run SGD on the primal: their loss plus
  their part of the coupling, which is a proximal pull toward an anchor (see
  `fedssl.learners.mocha`). This is how PFLlib's FedMTL applies MOCHA to deep
  models too, with two differences. PFLlib keeps Omega fixed at
  (I - 11^T/m)^2 (element-wise) and never updates it; here it is learned as in the paper.
  And PFLlib builds W from `state_dict()`, whose tensors are detached, so its
  coupling term adds no gradient and each of its clients trains alone; here the
  term's gradient reaches the weights.
- PFLlib sends each client the whole W, every client's model. Here client t is
  sent only what its objective needs: its anchor a_t = -sum_{j != t} (P_tj / P_tt) w_j
  (P = Omega^-1), one array per coupled array, and the scalar mu_t = lambda P_tt.
  One linear combination of the other tasks, as FedAvg's average is one, never a
  single other client's weights; the server keeps W and Omega
  (`ServerState.extras`) and sends them to nobody.
- Which arrays are coupled: by default every parameter, one whole model per
  client, as in the paper and PFLlib. `algorithm.mocha.patterns` couples only
  the matching parameters (e.g. the classifier, `["fc.*"]`); every other array
  is then a body shared by all, averaged as in FedAvg (FedPer's split, with the
  heads coupled through Omega).
- A task that has not trained yet has no model of its own to relate (its row is
  the initialization, identical across such tasks, which would make them look
  perfectly correlated): Omega is computed over the tasks that have reported, and
  the others stay independent (their block is I/m), so their term is weight decay.
- The paper's `rho` (CoCoA's safety factor sigma' for the dual subproblem) has no
  counterpart in primal SGD and is not used.

Special cases (tested): with Omega = I/m (`omega_every: 0` keeps it) the tasks are
independent and each client's term is weight decay lambda m / 2 ||w_t||^2: local
training. With uniform coupling, Omega proportional to (1 - rho) I + rho 11^T,
client t's anchor is gamma times the mean of the other tasks' weights,
gamma = (m - 1) rho / (1 + (m - 2) rho) (1 as rho -> 1): mean-regularized
multi-task learning (Evgeniou and Pontil, KDD 2004), a FedProx/Ditto-like proximal
pull toward the average of the other tasks.

The global model (`global_acc`, what is exported) is the mean over the tasks that
have reported, with the shared arrays; a client's personalized model is its own
w_t with the shared arrays, scored on its own local test split (`personal_acc`);
a client that never trained is scored with the global model.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np
import torch
from torch import nn

from fedssl.algorithms.aggregate import ServerState, weighted_average
from fedssl.algorithms.base import ALGORITHMS, Algorithm, LocalClient, ServerTrainer
from fedssl.algorithms.capabilities import Capabilities
from fedssl.algorithms.personal import readers
from fedssl.config.schema import ALGORITHM_SECTIONS, RecipeConfig
from fedssl.config.validate import require
from fedssl.errors import UserError
from fedssl.learners.mocha import MU, WORK, MochaLearner
from fedssl.learners.personal import personal_arrays
from fedssl.messages import Arrays, Payload, Update
from fedssl.models.personal import select_arrays

PATTERNS_KEY = "algorithm.mocha.patterns"
EIGEN_FLOOR = 1e-7  # the authors' floor on the Gram matrix's eigenvalues (run_mocha.m)
OMEGA, REPORTED, TASKS = "omega", "reported", "tasks/"  # ServerState.extras
WORK_STREAM = 0x4D4F4348  # "MOCH": tags the draws of each client's share of the step budget


@ALGORITHM_SECTIONS.register("mocha")
@dataclass
class MochaConfig:
    """`algorithm.mocha`: the coupling's weight, which arrays it couples, Omega's
    schedule and each client's amount of work."""

    lam: float = 1e-3  # lambda, the weight of the coupling lambda/2 tr(W^T Omega^-1 W) (the paper's code uses 1e-4 on linear models)
    patterns: list[str] = field(default_factory=list)  # fnmatch patterns of the parameters coupled through Omega, one copy per client (default: every parameter, a whole model per client); the other arrays are shared and averaged
    omega_every: int = 1  # rounds between closed-form Omega updates (the paper's H); 0 keeps Omega = I/m (independent tasks: local training with weight decay)
    work_min: float = 1.0  # each client's round runs a fraction of the step budget drawn uniformly in [work_min, work_max] per (seed, round, client): systems heterogeneity (the paper's code: 0.1 to 1.0)
    work_max: float = 1.0  # see work_min

    def check(self, cfg: RecipeConfig) -> None:
        name = cfg.algorithm.name
        require(self.lam >= 0, "algorithm.mocha.lam", f"must be >= 0, got {self.lam}")
        require(self.omega_every >= 0, "algorithm.mocha.omega_every", f"must be >= 0, got {self.omega_every}")
        require(0 < self.work_min <= 1, "algorithm.mocha.work_min", f"must be in (0, 1], got {self.work_min}")
        require(self.work_min <= self.work_max <= 1, "algorithm.mocha.work_max",
                f"must be in [work_min, 1] = [{self.work_min}, 1], got {self.work_max}")
        using = readers(Mocha)
        require(self == MochaConfig() or name in using, "algorithm.mocha",
                f"only {', '.join(using)} reads it; algorithm.name is {name!r}")


def closed_form_omega(gram: torch.Tensor, floor: float = EIGEN_FLOOR) -> torch.Tensor:
    """Omega = (W W^T)^(1/2) / tr((W W^T)^(1/2)) from the tasks' Gram matrix W W^T
    (m x m), its eigenvalues floored at `floor` first, in float64 (the paper's
    closed-form minimizer of tr(W^T Omega^-1 W) over positive definite Omega of trace 1)."""
    values, vectors = torch.linalg.eigh(gram.double())
    root = (vectors * values.clamp_min(floor).sqrt()) @ vectors.T
    root = (root + root.T) / 2  # symmetric to the last bit, so its inverse is too
    return root / torch.trace(root)


def gram_matrix(tasks: Sequence[torch.Tensor]) -> torch.Tensor:
    """W W^T over the coupled arrays, each (m, ...) with one row per task, in float64."""
    flat = [t.reshape(len(t), -1).double() for t in tasks]
    return sum(f @ f.T for f in flat)


def learned_omega(tasks: Sequence[torch.Tensor], reported: torch.Tensor) -> torch.Tensor:
    """Omega for m tasks: the closed form over the tasks that have reported, scaled
    to their share k/m of the trace; the others independent, I/m (the trace stays 1)."""
    m = len(reported)
    omega = torch.eye(m, dtype=torch.float64) / m
    index = reported.nonzero().flatten()
    if len(index) > 0:
        block = closed_form_omega(gram_matrix([t[index] for t in tasks])) * (len(index) / m)
        omega[index.unsqueeze(1), index] = block
    return omega


def coupling(omega: torch.Tensor, task: int) -> tuple[float, torch.Tensor]:
    """Task `task`'s part of tr(W^T Omega^-1 W): (P_tt, c) with P = Omega^-1 and
    c_j = -P_tj / P_tt for j != t (c_t = 0), so that its terms are, up to a constant,
    P_tt ||w_t - sum_j c_j w_j||^2 (`fedssl.learners.mocha`)."""
    precision = torch.linalg.inv(omega.double())
    diagonal = precision[task, task]
    weights = -precision[task] / diagonal
    weights[task] = 0.0
    return float(diagonal), weights


def anchor(tasks: dict[str, torch.Tensor], weights: torch.Tensor) -> Arrays:
    """sum_j weights_j w_j for each coupled array (rows of `tasks`), in its dtype."""
    return {name: torch.tensordot(weights.to(rows.device), rows.double(), dims=1).to(rows.dtype)
            for name, rows in tasks.items()}


@ALGORITHMS.register("mocha")
class Mocha(Algorithm):
    """MOCHA (see the module docstring): per-client models coupled through a learned
    task-relationship matrix Omega."""

    # every update holds every array: the server needs each w_t to relate the tasks
    capabilities = Capabilities(dense_updates=True, personalized=True, keeps_client_state=True,
                                reads_each_update="MOCHA relates each client's model to the others'")
    smoke = ("algorithm.mocha.work_min=0.5",)  # each client runs its own share of the steps

    def __init__(self, cfg: RecipeConfig):
        super().__init__(cfg)
        if cfg.data.labels.server_per_class > 0 and cfg.algorithm.ssl.server_steps > 0:
            raise UserError("algorithm.ssl.server_steps: mocha does not train on the server's labels (each task's "
                            "model is its client's); set it to 0")
        self.coupled: list[str] = []

    @property
    def settings(self) -> MochaConfig:
        return self.cfg.algorithm.mocha

    def make_learner(self, model: nn.Module) -> MochaLearner:
        self.coupled = self.coupled_names(model)
        return MochaLearner(model, self.cfg.train, self.coupled)

    def coupled_names(self, model: nn.Module) -> list[str]:
        parameters = [name for name, p in model.named_parameters() if p.is_floating_point()]
        patterns = self.settings.patterns
        if not patterns:
            return parameters
        names = select_arrays(model, patterns, key=PATTERNS_KEY)
        buffers = [n for n in names if n not in parameters]
        if buffers:
            raise UserError(f"{PATTERNS_KEY}: {buffers[0]!r} is a buffer of {type(model).__name__}, not a trained "
                            f"parameter; only parameters are coupled through Omega")
        return names

    def init_server_state(self, arrays: Arrays) -> ServerState:
        """Every task starts from the initial weights; Omega = I/m, no task reported."""
        m = self.cfg.federation.clients
        extras = {OMEGA: torch.eye(m, dtype=torch.float64) / m, REPORTED: torch.zeros(m, dtype=torch.bool)}
        extras |= {TASKS + name: arrays[name].unsqueeze(0).repeat(m, *[1] * arrays[name].dim())
                   for name in self.coupled}
        return ServerState(params=dict(arrays), extras=extras)

    def tasks(self, state: ServerState) -> dict[str, torch.Tensor]:
        return {name: state.extras[TASKS + name] for name in self.coupled}

    def server_round(self, round_index: int, state: ServerState, train_on_server: ServerTrainer | None) -> ServerState:
        """Every `omega_every` rounds after the first, Omega from the tasks' latest weights."""
        every = self.settings.omega_every
        if every <= 0 or round_index <= 1 or (round_index - 1) % every:
            return state
        omega = learned_omega(list(self.tasks(state).values()), state.extras[REPORTED])
        return replace(state, extras=state.extras | {OMEGA: omega})

    def work(self, round_index: int, client_id: int) -> float:
        """The fraction of the step budget client `client_id` runs in `round_index`."""
        low, high = self.settings.work_min, self.settings.work_max
        if low == high:
            return high
        # (seed, round, client) with a tag of its own: a stream apart from the client's batches'
        rng = np.random.default_rng([self.cfg.seed, round_index, client_id, WORK_STREAM])
        return float(rng.uniform(low, high))

    def payload(self, round_index: int, state: ServerState, client_id: int) -> Payload:
        """The shared arrays, and the client's anchor under the coupled arrays' names."""
        diagonal, weights = coupling(state.extras[OMEGA], client_id)
        arrays = {name: value for name, value in state.params.items() if name not in self.coupled}
        arrays |= anchor(self.tasks(state), weights)
        config = {MU: self.settings.lam * diagonal, WORK: self.work(round_index, client_id)}
        return Payload(round=round_index, arrays=arrays, config=config)

    def aggregate(self, updates: Sequence[Update], state: ServerState) -> ServerState:
        """Each client's row of W becomes its new weights; the shared arrays are
        averaged by example count; the global model's coupled arrays are the mean of
        the tasks that have reported."""
        trained = [u for u in updates if u.num_examples > 0]
        if not trained:
            return state
        extras, params = dict(state.extras), dict(state.params)
        reported = extras[REPORTED].clone()
        for name in self.coupled:
            rows = extras[TASKS + name].clone()  # new tensors: a state's arrays are never changed in place
            for update in trained:
                rows[update.client_id] = update.arrays[name]
            extras[TASKS + name] = rows
        for update in trained:
            reported[update.client_id] = True
        extras[REPORTED] = reported
        shared = [name for name in params if name not in self.coupled]
        if shared:
            params |= weighted_average([Update(u.client_id, {n: u.arrays[n] for n in shared}, u.num_examples)
                                        for u in trained])
        index = reported.nonzero().flatten()
        params |= {name: extras[TASKS + name][index].double().mean(0).to(params[name].dtype)
                   for name in self.coupled}
        return replace(state, params=params, extras=extras)

    def personal_weights(self, global_weights: Arrays, client: LocalClient) -> Arrays:
        return global_weights | personal_arrays(client.state)
