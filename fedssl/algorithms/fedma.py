"""FedMA: federated matched averaging, layer by layer, then FedAvg on the matched model.

Wang, Yurochkin, Sun, Papailiopoulos and Khazaeni, "Federated Learning with Matched
Averaging", ICLR 2020 (openreview.net/forum?id=BkluqlSFDS; code github.com/IBM/FedMA).

Hidden units of one layer trained on different clients are permuted relative to
each other, so averaging them coordinate-wise blurs them. FedMA matches them first
(fedssl.algorithms.matching: PFNM's BBP-MAP assignment) and averages matched units,
one layer at a time. With H hidden layers and a classifier, round r is:

- r <= H: clients train layers r..H+1 (the first r-1 are the matched global ones,
  frozen, sent as payload extras), the server matches layer r across the updates
  and averages matched units; the global layer may grow, up to
  `algorithm.fedma.max_width_factor` x its initial width. Each client's next
  layer gets its inputs moved where its units went (zeros where it has none),
  and the server keeps each client's layers after r for its next round (server
  state `client/<id>/<array>`): a client trains on from its own model.
- r = H + 1: clients train only the classifier; the server averages it.
- r > H + 1: FedAvg rounds on the matched model, every layer trained.

Round 1 is the clients' local training from one shared initialization. The global
model after round r is the matched layers <= r with the example-weighted average
of the clients' (patched) later layers, which is what is evaluated every round.

Where this differs from the authors' code, for a simpler and cheaper run:
- After the layer-wise pass it runs FedAvg on the matched (possibly wider) model;
  the paper's "FedMA with communication" re-matches every layer each
  communication round, with clients reconstructing their original-size models.
- A matched unit is the example-weighted mean of its client units (the sigma0 ->
  infinity limit of PFNM's posterior mean; see `matching`), and the classifier
  is averaged by example counts, where their code weights each class's output
  by the clients' counts of that class (which the server here never sees).
- Clients that were not sampled in a round start the next from the global model's
  averaged later layers (the paper has every client take part in every round).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch
from torch import nn

from fedssl.algorithms.aggregate import ServerState, weighted_average
from fedssl.algorithms.base import ALGORITHMS, Algorithm, ServerTrainer
from fedssl.algorithms.capabilities import Capabilities
from fedssl.algorithms.matching import match_layer, matched_average, patch_inputs
from fedssl.config.schema import ALGORITHM_SECTIONS, RecipeConfig
from fedssl.config.validate import require
from fedssl.learners.fedma import FedMALearner
from fedssl.messages import Arrays, Payload, Update
from fedssl.models.chain import Layer, layer_chain, resize_to

ROUND_KEY = "fedma/round"  # the round being aggregated, recorded before its payloads are built
CLIENT_PREFIX = "client/"  # client/<id>/<array>: a client's own later layers, for its next round


@ALGORITHM_SECTIONS.register("fedma")
@dataclass
class FedMAConfig:
    """`algorithm.fedma`: the matching's prior and how far layers may grow."""

    sigma: float = 1.0  # std of a client's unit around its global unit (PFNM's sigma; FedMA's code: 1.0)
    sigma0: float = 1.0  # std of the global units' prior (PFNM's sigma0; FedMA's code: 1.0)
    gamma: float = 7.0  # Indian-buffet mass: how readily a client unit opens a new global unit (FedMA's code: 7.0)
    iterations: int = 5  # sweeps re-matching each client against the others (FedMA's code: 5)
    max_width_factor: float = 1.5  # a matched layer holds at most this many times its initial units (1: no growth)

    def check(self, cfg: RecipeConfig) -> None:
        for key in ("sigma", "sigma0", "gamma"):
            value = getattr(self, key)
            require(value > 0, f"algorithm.fedma.{key}", f"must be > 0, got {value}")
        require(self.iterations >= 0, "algorithm.fedma.iterations", f"must be >= 0, got {self.iterations}")
        require(self.max_width_factor >= 1, "algorithm.fedma.max_width_factor",
                f"must be >= 1 (a layer never shrinks), got {self.max_width_factor}")
        if cfg.algorithm.name == "fedma":
            require(cfg.algorithm.ssl.server_steps == 0, "algorithm.ssl.server_steps",
                    "fedma does not train on the server's labels (it would change layers the clients keep frozen); set 0")


def units_of(arrays: Arrays, layer: Layer) -> np.ndarray:
    """A layer's units as rows: incoming weights flattened, then the bias."""
    weight = arrays[layer.weight_name].detach().double()
    rows = [weight.reshape(weight.shape[0], -1)]
    if layer.bias:
        rows.append(arrays[f"{layer.name}.bias"].detach().double()[:, None])
    return torch.cat(rows, dim=1).numpy()


def arrays_of(units: np.ndarray, layer: Layer, like: Arrays) -> Arrays:
    """`units_of`'s inverse, for `units.shape[0]` units, in the dtypes of `like`."""
    weight = like[layer.weight_name]
    flat = torch.from_numpy(units)
    columns = flat.shape[1] - int(layer.bias)
    arrays = {layer.weight_name: flat[:, :columns].reshape(len(units), *weight.shape[1:]).to(weight.dtype)}
    if layer.bias:
        arrays[f"{layer.name}.bias"] = flat[:, columns].to(like[f"{layer.name}.bias"].dtype)
    return arrays


def match_step(models: Sequence[Arrays], weights: Sequence[int], chain: Sequence[Layer], index: int,
               cfg: FedMAConfig, max_width: int, rng: np.random.Generator) -> tuple[Arrays, list[Arrays]]:
    """Match layer `chain[index]` across `models` (each holding that layer and every
    later one, the layers before already matched): the global layer, and each
    model's later layers with the next layer's inputs patched to the global units."""
    layer, following = chain[index], chain[index + 1]
    units = [units_of(model, layer) for model in models]
    assignments, width = match_layer(units, cfg.sigma, cfg.sigma0, cfg.gamma, max_width, cfg.iterations, rng,
                                     bias=layer.bias)
    matched = arrays_of(matched_average(units, assignments, width, weights), layer, models[0])
    later = {name for later_layer in chain[index + 1:] for name in later_layer.array_names}
    rest = []
    for model, assignment in zip(models, assignments):
        own = {name: model[name] for name in later}
        own[following.weight_name] = patch_inputs(model[following.weight_name], assignment, width)
        rest.append(own)
    return matched, rest


def one_shot(models: Sequence[Arrays], weights: Sequence[int], chain: Sequence[Layer], cfg: FedMAConfig,
             seed: int = 0) -> Arrays:
    """Match whole models layer by layer without retraining between layers (PFNM's
    one-shot fusion; FedMA retrains in between): the matched model, its classifier
    averaged by `weights`."""
    rng = np.random.default_rng(seed)
    matched: Arrays = {}
    rest = [dict(model) for model in models]
    for index in range(len(chain) - 1):
        layer, rest = match_step(rest, weights, chain, index, cfg, round(cfg.max_width_factor * chain[index].width), rng)
        matched |= layer
    return matched | average(rest, weights)


def average(models: Sequence[Arrays], weights: Sequence[int]) -> Arrays:
    """The `weights`-weighted mean of each array (example counts, as FedAvg's)."""
    return weighted_average([Update(-1, model, weight) for model, weight in zip(models, weights)])


@ALGORITHMS.register("fedma")
class FedMA(Algorithm):
    """FedMA (Wang et al., ICLR 2020): layer-wise matched averaging of conv/linear
    layers, then FedAvg on the matched model (see the module docstring)."""

    # an update holds exactly the layers it was sent to train; the server matches each one's units
    capabilities = Capabilities(dense_updates=True, reads_each_update="FedMA matches each client's units")
    smoke = ("algorithm.fedma.iterations=1",)  # one re-matching sweep, not 5: the same code, sooner

    def __init__(self, cfg: RecipeConfig):
        super().__init__(cfg)
        self.chain: list[Layer] = []

    def make_learner(self, model: nn.Module) -> FedMALearner:
        self.chain = layer_chain(model)
        return FedMALearner(model, self.cfg.train)

    def shape_model(self, model: nn.Module, weights: Arrays) -> None:
        """The matched layers' widths, read from the weights (an exported FedMA model)."""
        layer_chain(model)  # refuses a model it could not have matched
        resize_to(model, weights)

    @property
    def hidden(self) -> int:
        """Layers matched: all but the classifier."""
        return len(self.chain) - 1

    def frozen(self, round_index: int) -> list[str]:
        """The arrays clients keep fixed in `round_index`: the layers matched before it."""
        if round_index > self.hidden + 1:
            return []
        return [name for layer in self.chain[: round_index - 1] for name in layer.array_names]

    def server_round(self, round_index: int, state: ServerState, train_on_server: ServerTrainer | None) -> ServerState:
        """Record the round, for `aggregate` to know which layer it matches."""
        return replace(state, extras=state.extras | {ROUND_KEY: torch.tensor(round_index)})

    def payload(self, round_index: int, state: ServerState, client_id: int) -> Payload:
        """The frozen matched layers as extras; the layers to train as arrays: the
        client's own (patched) later layers where the server kept them, else the
        global model's."""
        frozen = set(self.frozen(round_index))
        own = f"{CLIENT_PREFIX}{client_id}/"
        train = {name: state.extras.get(own + name, array) for name, array in state.params.items() if name not in frozen}
        return Payload(round=round_index, arrays=train, extras={name: state.params[name] for name in frozen})

    def aggregate(self, updates: Sequence[Update], state: ServerState) -> ServerState:
        round_index = int(state.extras[ROUND_KEY])
        kept = {k: v for k, v in state.extras.items() if not k.startswith(CLIENT_PREFIX)}
        trained = [u for u in updates if u.num_examples > 0]
        if not trained:
            return replace(state, extras=kept)
        weights = [u.num_examples for u in trained]
        if round_index > self.hidden:  # the classifier alone, then whole models: FedAvg
            return ServerState(params=state.params | weighted_average(trained), extras=kept)
        index = round_index - 1
        layer = self.chain[index]
        rng = np.random.default_rng([self.cfg.seed, round_index])
        max_width = round(self.cfg.algorithm.fedma.max_width_factor * layer.width)
        matched, rest = match_step([u.arrays for u in trained], weights, self.chain, index,
                                   self.cfg.algorithm.fedma, max_width, rng)
        clients = {f"{CLIENT_PREFIX}{u.client_id}/{name}": array for u, own in zip(trained, rest)
                   for name, array in own.items()}
        return ServerState(params=state.params | matched | average(rest, weights), extras=kept | clients)
