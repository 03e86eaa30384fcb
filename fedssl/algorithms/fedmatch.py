"""FedMatch's server side (Jeong et al., "Federated Semi-Supervised Learning with
Inter-Client Consistency & Disjoint Learning", ICLR 2021, arXiv:2006.12097).

The global model is kept decomposed, "sigma/<param>" + "psi/<param>" plus buffers
under their own names (see `fedssl.learners.fedmatch` for the client's loss). Each
round the server:

1. with labels at the server, trains sigma on them (the learner's "server" role);
2. every `helper_every` rounds, picks for every client that has reported its H
   nearest other client models, by their softmax outputs on a fixed random probe
   (a KD-tree over these embeddings, as the authors do), and keeps copies of the
   chosen models, which go to that client as frozen helpers ("helper<j>/<name>" in
   `Payload.extras`) until the next refresh;
3. decodes each client's sparse deltas against the weights it broadcast, averages
   sigma and psi separately over the clients that sent them (weighted by example
   count, as FedAvg), averages the buffers, and embeds each client's new model.

Everything the server remembers between rounds (each client's latest model and
embedding, the chosen helpers and their snapshots) is FedMatch's declared server
state, `ServerState.extras` ("model/<client>/<name>", "embedding/<client>",
"helpers/<client>", "snapshot/<client>/<name>", "refreshed"): checkpointed whole,
so aggregation stays a pure function and a resumed run picks helpers exactly as
the killed one would have, and never part of the arrays that are sent or evaluated. The authors' code differs in two ways we do not follow:
it sends a helper's psi only (the receiver adds its own sigma), and only on refresh
rounds (no helpers in between); here a helper is the full sigma + psi model of that
client and the cached choice is sent every round.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch
from scipy.spatial import cKDTree
from torch import nn
from torch.func import functional_call

from fedssl.algorithms.capabilities import Capabilities
from fedssl.config.schema import ALGORITHM_SECTIONS, RecipeConfig
from fedssl.config.validate import require
from fedssl.errors import UserError
from fedssl.algorithms.aggregate import ServerState, weighted_average
from fedssl.algorithms.base import ALGORITHMS, SMOKE_FEW_LABELS_PER_CLIENT, Algorithm, ServerTrainer
from fedssl.messages import Arrays, Payload, Update
from fedssl.learners.fedmatch import PSI, SIGMA, FedMatchLearner, decode_delta

PROBES = 10  # random images that embed a model


@ALGORITHM_SECTIONS.register("fedmatch")
@dataclass
class FedMatchConfig:
    """`algorithm.fedmatch`: FedMatch's loss weights, helpers and upload sparsity."""

    lambda_s: float = 10.0  # weight of the labeled loss on sigma
    lambda_iccs: float = 1e-2  # weight of the inter-client consistency (KL to helpers)
    lambda_l1: float = 1e-4  # L1 sparsity of psi (the paper uses 1e-5 with labels at the server)
    lambda_l2: float = 10.0  # L2 tie of psi to the frozen sigma
    tau: float = 0.85  # confidence threshold of agreement-based pseudo-labels
    helpers: int = 2  # H: nearest client models sent as helpers
    helper_every: int = 10  # h: rounds between helper refreshes
    sparsity: float = 1e-5  # delta entries with |value| below this are not sent

    def check(self, cfg: RecipeConfig) -> None:
        require(0 <= self.tau <= 1, "algorithm.fedmatch.tau", f"must be in [0, 1], got {self.tau}")
        require(self.helpers >= 0, "algorithm.fedmatch.helpers", f"must be >= 0, got {self.helpers}")
        require(self.helper_every >= 1, "algorithm.fedmatch.helper_every", f"must be >= 1, got {self.helper_every}")
        require(self.sparsity >= 0, "algorithm.fedmatch.sparsity", f"must be >= 0, got {self.sparsity}")


def nearest_helpers(embeddings: np.ndarray, num_helpers: int) -> list[list[int]]:
    """For each row of `embeddings`, the rows of its `num_helpers` nearest other rows
    (Euclidean), nearest first; fewer where there are fewer other rows."""
    n = len(embeddings)
    if num_helpers <= 0 or n < 2:
        return [[] for _ in range(n)]
    k = min(num_helpers + 1, n)  # +1: each row finds itself too
    _, found = cKDTree(embeddings).query(embeddings, k=k)
    found = np.asarray(found).reshape(n, k)
    return [[int(j) for j in row if j != i][:num_helpers] for i, row in enumerate(found)]


def decomposed_names(params: Arrays) -> list[str]:
    return [k[len(SIGMA):] for k in params if k.startswith(SIGMA)]


def plain_names(params: Arrays) -> list[str]:
    """Buffers (and any non-floating parameter): shared as they are."""
    return [k for k in params if not k.startswith((SIGMA, PSI))]


def client_ids(extras: Arrays, kind: str) -> list[int]:
    """The clients that have an `extras` entry of `kind` ("embedding", ...)."""
    prefix = f"{kind}/"
    return sorted({int(k[len(prefix):].split("/")[0]) for k in extras if k.startswith(prefix)})


@ALGORITHMS.register("fedmatch")
class FedMatch(Algorithm):
    """FedMatch: inter-client consistency with helper models, and disjoint learning
    of sigma (labels) and psi (unlabeled data), with sparse uploads.

    Labels at the clients (`data.labels.mode` client, all or mixed): clients train
    sigma on their labels and psi on their unlabeled data. Labels at the server
    (`server`): clients train and upload psi only. Wherever the server holds labels
    (`data.labels.server_per_class` and `algorithm.ssl.server_steps` > 0) it trains
    sigma on them before each broadcast. Averaging is plain (`algorithm.server_lr`
    and `server_momentum` are not used).
    """

    capabilities = Capabilities(reads_each_update="FedMatch keeps each client's model to choose its helpers")
    smoke = SMOKE_FEW_LABELS_PER_CLIENT  # both sigma and psi train; helpers are first chosen before round 2

    def __init__(self, cfg: RecipeConfig):
        super().__init__(cfg)
        self.labels_at_server = cfg.data.labels.mode == "server"
        if self.labels_at_server and (cfg.algorithm.ssl.server_steps <= 0 or cfg.data.labels.server_per_class <= 0):
            raise UserError("algorithm.ssl.server_steps: fedmatch with data.labels.mode=server trains sigma on the "
                            "server's labels: set server_steps > 0 and data.labels.server_per_class > 0")
        self.model: nn.Module | None = None
        # A fixed probe, drawn from the run seed, in the data's [-1, 1] range.
        generator = torch.Generator().manual_seed(cfg.seed)
        shape = (PROBES, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
        self.probe = torch.rand(shape, generator=generator) * 2 - 1

    def make_learner(self, model: nn.Module) -> FedMatchLearner:
        self.model = model  # the architecture the server embeds client models with
        return FedMatchLearner(model, self.cfg.train, self.cfg.algorithm.fedmatch)

    def shared_names(self, learner: FedMatchLearner) -> list[str]:
        return learner.shared_names()

    def payload(self, round_index: int, state: ServerState, client_id: int) -> Payload:
        params, extras = state.params, state.extras
        helper_models = {}
        helpers = extras.get(f"helpers/{client_id}")
        if helpers is not None:
            names = decomposed_names(params) + plain_names(params)
            for j, helper in enumerate(helpers.tolist()):
                helper_models |= {f"helper{j}/{n}": extras[f"snapshot/{helper}/{n}"] for n in names}
        config = {"role": "client", "train_sigma": not self.labels_at_server}
        return Payload(round=round_index, arrays=params, config=config, extras=helper_models)

    def server_round(self, round_index: int, state: ServerState, train_on_server: ServerTrainer | None) -> ServerState:
        params = dict(state.params)
        if train_on_server is not None:
            update = train_on_server(Payload(round=round_index, arrays=params, config={"role": "server"}))
            params |= {k: v for k, v in update.arrays.items() if not k.startswith(PSI)}  # sigma and buffers
        return replace(state, params=params, extras=self.refresh_helpers(round_index, params, state.extras))

    def refresh_helpers(self, round_index: int, params: Arrays, extras: Arrays) -> Arrays:
        """`extras` with new helpers if `helper_every` rounds have passed since the last
        choice (or none was made yet) and at least two clients have reported."""
        cfg = self.cfg.algorithm.fedmatch
        ids = client_ids(extras, "embedding")
        last = extras.get("refreshed")
        if cfg.helpers <= 0 or len(ids) < 2 or (last is not None and round_index - int(last) < cfg.helper_every):
            return extras
        embeddings = torch.stack([extras[f"embedding/{c}"] for c in ids]).cpu().numpy()
        nearest = nearest_helpers(embeddings, cfg.helpers)
        fresh = {k: v for k, v in extras.items() if not k.startswith(("helpers/", "snapshot/"))}
        names = decomposed_names(params) + plain_names(params)
        for row, client in zip(nearest, ids):
            fresh[f"helpers/{client}"] = torch.tensor([ids[j] for j in row], dtype=torch.int64)
        for helper in {ids[j] for row in nearest for j in row}:
            # The models as they are now, kept until the next refresh (no copy: arrays are never changed in place).
            fresh |= {f"snapshot/{helper}/{n}": extras[f"model/{helper}/{n}"] for n in names}
        fresh["refreshed"] = torch.tensor(round_index, dtype=torch.int64)
        return fresh

    def aggregate(self, updates: Sequence[Update], state: ServerState) -> ServerState:
        trained = [u for u in updates if u.num_examples > 0]
        if not trained:
            return state
        params, extras = dict(state.params), dict(state.extras)
        names, plain = decomposed_names(params), plain_names(params)
        models = {u.client_id: self.decode(u, params, names, plain) for u in trained}
        for part in (SIGMA, PSI):
            senders = [u for u in trained if any(k.startswith(part) for k in u.arrays)]
            if senders:  # a part nobody trained stays as it was
                params |= weighted_average([Update(u.client_id, {part + n: models[u.client_id][part + n] for n in names},
                                                   u.num_examples) for u in senders])
        if plain:
            params |= weighted_average([Update(u.client_id, {n: models[u.client_id][n] for n in plain}, u.num_examples)
                                        for u in trained])
        for client, arrays in models.items():
            theta = {n: arrays[SIGMA + n] + arrays[PSI + n] for n in names} | {n: arrays[n] for n in plain}
            extras |= {f"model/{client}/{n}": v for n, v in theta.items()}
            extras[f"embedding/{client}"] = self.embed(theta)
        return replace(state, params=params, extras=extras)

    @staticmethod
    def decode(update: Update, params: Arrays, names: list[str], plain: list[str]) -> Arrays:
        """A client's sigma, psi and buffers: sparse deltas applied to the broadcast
        weights; what it did not send is the broadcast value."""
        out = {}
        for key in [SIGMA + n for n in names] + [PSI + n for n in names]:
            if f"{key}/index" in update.arrays:
                out[key] = decode_delta(params[key], update.arrays[f"{key}/index"], update.arrays[f"{key}/value"])
            else:
                out[key] = update.arrays.get(key, params[key])
        return out | {n: update.arrays.get(n, params[n]) for n in plain}

    def embed(self, theta: Arrays) -> torch.Tensor:
        """A model's softmax outputs on the fixed probe, flattened."""
        if self.model is None:
            raise RuntimeError("FedMatch.make_learner must be called before aggregating")
        device = next(iter(theta.values())).device
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            out = functional_call(self.model, theta, (self.probe.to(device),)).softmax(1).flatten().float()
        self.model.train(was_training)
        return out

    def global_weights(self, state: ServerState) -> Arrays:
        params = state.params
        return ({n: params[SIGMA + n] + params[PSI + n] for n in decomposed_names(params)}
                | {n: params[n] for n in plain_names(params)})
