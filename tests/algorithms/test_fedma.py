"""FedMA: the matching (PFNM's cost, permutations recovered, function kept), the
layer-wise schedule (frozen layers untouched), unsupported models, resume, Flower."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from fedssl.algorithms.fedma import FedMAConfig, match_step, one_shot, units_of
from fedssl.algorithms.matching import assignment_cost, match_layer, patch_inputs
from fedssl.config.load import load_recipe
from fedssl.config.schema import ModelConfig
from fedssl.engine.stages import check
from fedssl.errors import UserError
from fedssl.engine.checkpoint import load_checkpoint
from fedssl.engine.federation import Federation
from fedssl.engine.run import run_federation
from fedssl.models.chain import layer_chain
from fedssl.models.factory import build_model

FEDMA = ["algorithm.name=fedma", "train.local_steps=2"]
# A tight noise and prior scale: a unit's exact twin is far likelier than a new global unit.
SHARP = FedMAConfig(sigma=0.05, sigma0=0.05, iterations=1)


def cnn(name: str = "fedavg_cnn", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig(name=name), 7, 1, 28)


def permuted(model: nn.Module, seed: int, only: int | None = None) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """The model's arrays with every hidden layer's units shuffled (or only layer
    `only`'s), and the next layer's inputs with them: the same function. Also the
    permutations (the identity for layers left alone)."""
    arrays = {k: v.clone() for k, v in model.state_dict().items()}
    chain = layer_chain(model)
    generator = torch.Generator().manual_seed(seed)
    perms = []
    for layer, following in zip(chain, chain[1:]):
        perm = torch.randperm(layer.width, generator=generator)
        if only is not None and layer is not chain[only]:
            perm = torch.arange(layer.width)
        perms.append(perm)
        for name in layer.array_names:
            arrays[name] = arrays[name][perm]
        weight = arrays[following.weight_name]
        grouped = weight.reshape(weight.shape[0], layer.width, -1)[:, perm]
        arrays[following.weight_name] = grouped.reshape(weight.shape)
    return arrays, perms


# -- the matching ---------------------------------------------------------------------------------


def test_the_assignment_cost_matches_a_hand_computed_example():
    # one client unit w = (1, 0) against one global unit holding (2, 0) (natural mean
    # G = (2, 0), precision P = 2) with sigma = sigma0 = 1, J = 3 clients, 2 of them in it
    cost = assignment_cost(np.array([[1.0, 0.0]]), sums=np.array([[2.0, 0.0]]), precisions=np.array([2.0]),
                           counts=np.array([2]), mean=np.zeros(2), sigma=1.0, sigma0=1.0, gamma=3.0, clients=3,
                           max_added=2)
    # existing: |G + w|^2 / (P + 1) - |G|^2 / P + log(2 / (3 - 2)) = 9/3 - 4/2 + log 2
    # new k-th: |w|^2 / (1 + 1) - 0 - 2 log k + 2 log(gamma / J)  = 1/2 - 2 log k
    assert cost.shape == (1, 3)
    np.testing.assert_allclose(cost, [[1 + math.log(2), 0.5, 0.5 - 2 * math.log(2)]], rtol=1e-12)


def test_the_cost_scales_with_sigma_and_the_bias_prior():
    # sigma = 0.5 (1/sigma^2 = 4), sigma0 = 1, prior mean (0, 0.1): a unit (weight 1, bias 0)
    cost = assignment_cost(np.array([[1.0, 0.0]]), sums=np.zeros((0, 2)), precisions=np.zeros(0),
                           counts=np.zeros(0, dtype=int), mean=np.array([0.0, 0.1]), sigma=0.5, sigma0=1.0,
                           gamma=2.0, clients=2, max_added=1)
    # |(4, 0) + (0, 0.1)|^2 / (1 + 4) - |(0, 0.1)|^2 / 1 + 2 log(2 / 2)
    np.testing.assert_allclose(cost, [[(16 + 0.01) / 5 - 0.01]], rtol=1e-12)


def test_matching_a_layer_against_a_permuted_copy_recovers_the_permutation():
    model = cnn()
    chain = layer_chain(model)
    original = model.state_dict()
    for index, layer in enumerate(chain[:-1]):
        # a layer is matched once the ones before it are: its inputs are in the global order
        arrays, perms = permuted(model, seed=1, only=index)
        units = [units_of(original, layer), units_of(arrays, layer)]
        assignments, width = match_layer(units, SHARP.sigma, SHARP.sigma0, SHARP.gamma, max_width=2 * layer.width,
                                         iterations=2, rng=np.random.default_rng(0))
        assert width == layer.width, layer.name  # nothing new opened
        assert np.array_equal(assignments[0], np.arange(layer.width))
        # the copy's unit l is the original's unit perm[l], and goes where that one is
        assert np.array_equal(assignments[1], perms[index].numpy()), layer.name


def test_matched_averaging_of_permuted_copies_is_the_original_model():
    model = cnn().eval()
    copies = [permuted(model, seed) for seed in (1, 2)]
    assert any(not torch.equal(copies[0][0][n], v) for n, v in model.state_dict().items())
    merged = one_shot([model.state_dict()] + [arrays for arrays, _ in copies], [10, 20, 30], layer_chain(model), SHARP)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(merged[name], value, rtol=0, atol=1e-6, msg=name)
    x = torch.randn(4, 1, 28, 28)
    plain = {n: sum(a[n] for a, _ in copies) / 2 for n in merged}  # coordinate-wise FedAvg blurs them
    with torch.no_grad():
        want = model(x)
        model.load_state_dict(merged)
        torch.testing.assert_close(model(x), want, rtol=0, atol=1e-5)
        model.load_state_dict(plain)
        assert not torch.allclose(model(x), want, atol=1e-3)


def test_the_global_layer_grows_up_to_the_width_limit():
    torch.manual_seed(0)
    chain = layer_chain(cnn())
    models = [cnn(seed=s).state_dict() for s in range(3)]  # unrelated models: their units hardly match
    loose = FedMAConfig(sigma=0.1, gamma=50.0)
    matched, rest = match_step(models, [1, 1, 1], chain, 0, loose, max_width=40, rng=np.random.default_rng(0))
    assert matched["conv1.weight"].shape == (40, 1, 5, 5) and matched["conv1.bias"].shape == (40,)
    # each client's next layer reads the 40 global channels: its own where its units went, zeros elsewhere
    for model, own in zip(models, rest):
        patched = own["conv2.weight"]
        assert patched.shape == (64, 40, 5, 5)
        kept = patched.abs().sum(dim=(0, 2, 3)) > 0
        assert int(kept.sum()) == 32
        assert torch.allclose(patched.sum(dim=(1, 2, 3)), model["conv2.weight"].sum(dim=(1, 2, 3)))


def test_patching_moves_a_linear_layers_input_blocks_whole():
    weight = torch.arange(12.0).reshape(2, 6)  # 3 input channels of 2 positions each
    patched = patch_inputs(weight, np.array([2, 0, 3]), width=4)
    assert torch.equal(patched, torch.tensor([[2.0, 3, 0, 0, 0, 1, 4, 5], [8, 9, 0, 0, 6, 7, 10, 11]]))


# -- models it cannot match -----------------------------------------------------------------------


def test_an_unsupported_model_is_refused_naming_the_layer(tiny_recipe):
    cfg = load_recipe(tiny_recipe, [*FEDMA, "model.name=resnet18"])
    with pytest.raises(UserError, match=r"model.name: fedma .* BatchNorm2d 'bn1'"):
        Federation.build(cfg)


def test_a_residual_connection_is_refused_naming_where():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 8 * 8, 3)

        def forward(self, x):
            x = self.a(x)
            return self.fc((x + self.b(x)).flatten(1))

    with pytest.raises(UserError, match="combines two tensors at 'add'.*residual"):
        layer_chain(Residual())


def test_the_vgg9_cnn_is_a_chain_of_nine_layers():
    chain = layer_chain(cnn("vgg9_cnn"))
    assert [layer.kind for layer in chain] == ["conv"] * 6 + ["linear"] * 3
    assert chain[6].spatial == 9  # 256 channels of 3x3 positions at 28x28 inputs


# -- the layer-wise schedule ----------------------------------------------------------------------


def test_a_layer_wise_round_trains_only_the_layers_after_the_matched_ones(tiny_recipe):
    federation = Federation.build(load_recipe(tiny_recipe, FEDMA))
    algorithm = federation.algorithm
    state, _ = federation.fit_round(1, federation.initial_state())
    width = state.params["conv1.weight"].shape[0]
    assert 32 <= width <= 48 and state.params["conv2.weight"].shape[1] == width
    state = algorithm.server_round(2, state, None)
    client = 0
    payload = algorithm.payload(2, state, client)
    assert sorted(payload.extras) == ["conv1.bias", "conv1.weight"]  # the matched layer, frozen
    assert set(payload.arrays) == set(state.params) - set(payload.extras)
    update, _ = federation.clients.train(client, payload)
    live = federation.model.state_dict()
    for name, sent in payload.extras.items():
        assert torch.equal(live[name], sent), f"{name} moved"
    assert set(update.arrays) == set(payload.arrays)  # only what trained goes up
    assert all(update.arrays[n].shape == payload.arrays[n].shape for n in payload.arrays)
    assert not torch.equal(update.arrays["conv2.weight"], payload.arrays["conv2.weight"])
    assert check(federation, client, update, payload) is None
    # the server checks replies against the shapes it sent: a reply at the old width is dropped
    stale = dict(update.arrays) | {"conv2.weight": update.arrays["conv2.weight"][:, :32]}
    if width > 32:
        assert "has shape" in check(federation, client, type(update)(client, stale, update.num_examples), payload)


def test_after_the_layer_wise_pass_rounds_are_fedavg_on_the_matched_model(tiny_recipe):
    federation = Federation.build(load_recipe(tiny_recipe, FEDMA))
    algorithm, state = federation.algorithm, federation.initial_state()
    assert algorithm.hidden == 3
    frozen = [sorted(algorithm.payload(r, algorithm.server_round(r, state, None), 0).extras) for r in range(1, 6)]
    assert frozen[0] == [] and frozen[4] == []
    assert frozen[3] == sorted(["conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", "fc1.weight", "fc1.bias"])


def test_a_fedma_run_loads_as_a_trained_model_with_its_grown_layers(tiny_recipe, tmp_path):
    from fedssl.trained import load_trained

    run_federation(load_recipe(tiny_recipe, [*FEDMA, "federation.rounds=1"]), tmp_path / "run")
    params = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["server_state"]["params"]
    trained = load_trained(tmp_path / "run")
    assert {n: a.shape for n, a in trained.model.state_dict().items()} == {n: a.shape for n, a in params.items()}
    assert all(torch.equal(trained.model.state_dict()[n], a) for n, a in params.items())


def test_fedma_refuses_server_side_training(tiny_recipe):
    with pytest.raises(UserError, match="algorithm.ssl.server_steps: fedma"):
        load_recipe(tiny_recipe, [*FEDMA, "algorithm.ssl.server_steps=3"])


# -- resume and Flower ----------------------------------------------------------------------------


@pytest.mark.slow
def test_a_resumed_fedma_run_ends_exactly_as_an_uninterrupted_one(tiny_recipe, tmp_path):
    fedma = [*FEDMA, "federation.evaluation.eval_every=10"]  # evaluated after the last round only
    run_federation(load_recipe(tiny_recipe, [*fedma, "federation.rounds=4"]), tmp_path / "whole")
    # stopped after round 2, mid-way through the layer-wise pass (widths grown, clients' layers held)
    run_federation(load_recipe(tiny_recipe, [*fedma, "federation.rounds=2"]), tmp_path / "resumed")
    stopped = load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")["server_state"]
    assert any(name.startswith("client/") for name in stopped["extras"])
    run_federation(load_recipe(tiny_recipe, [*fedma, "federation.rounds=4"]), tmp_path / "resumed", resume=True)
    whole = load_checkpoint(tmp_path / "whole" / "checkpoint.pt")["server_state"]
    again = load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")["server_state"]
    for part in ("params", "extras"):
        assert whole[part].keys() == again[part].keys()
        for name, value in whole[part].items():
            assert torch.equal(value, again[part][name]), f"{part}: {name}"


@pytest.mark.slow
def test_fedma_runs_on_the_flower_simulation_as_in_process(tiny_recipe):
    from fedssl.launch import launch

    overrides = [*FEDMA, "federation.rounds=2"]
    _, flower_dir, flower = launch(str(tiny_recipe), overrides + ["name=flower", "federation.backend=flower"])
    _, local_dir, local = launch(str(tiny_recipe), overrides + ["name=local"])
    assert flower["bytes_up"] == local["bytes_up"] > 0 and flower["bytes_down"] == local["bytes_down"]
    assert flower["global_acc"] == pytest.approx(local["global_acc"], abs=1e-6)
    got = load_checkpoint(flower_dir / "checkpoint.pt")["server_state"]["params"]
    want = load_checkpoint(local_dir / "checkpoint.pt")["server_state"]["params"]
    assert {n: a.shape for n, a in got.items()} == {n: a.shape for n, a in want.items()}
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)
