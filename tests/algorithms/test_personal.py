"""FedPer, FedRep, FedBN and Ditto: what is sent, what stays, and the arithmetic of a step."""

import numpy as np
import pytest
import torch
from torch import nn

from fedssl.config.load import load_recipe
from fedssl.errors import UserError
from fedssl.algorithms.base import build_algorithm
from fedssl.engine.federation import Federation
from fedssl.messages import Payload
from fedssl.algorithms.base import LocalClient
from fedssl.learners.base import ClientContext

HEAD = ("fc.weight", "fc.bias")
NORM_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
NORMS = tuple(f"{layer}.{suffix}" for layer in ("bn1", "bn2") for suffix in NORM_SUFFIXES)


def fit_one(federation: Federation, client_id: int = 0, state=None, round_index: int = 1):
    client = federation.data.clients[client_id]
    payload = federation.algorithm.payload(round_index, federation.initial_state(), client_id)
    return payload, *federation.trainer.fit(client_id, client.labeled, client.unlabeled, payload, state)


@pytest.mark.parametrize("algorithm", ["fedper", "fedrep"])
def test_the_head_never_leaves_the_client(tiny_recipe, algorithm):
    federation = Federation.build(load_recipe(tiny_recipe, [f"algorithm.name={algorithm}", "train.local_steps=2"]))
    payload, update, kept = fit_one(federation)
    assert not set(HEAD) & set(payload.arrays), "the head is not broadcast"
    assert not set(HEAD) & set(update.arrays), "the head is not sent"
    assert set(update.arrays) == set(federation.model.state_dict()) - set(HEAD)
    assert {f"personal/{n}" for n in HEAD} <= set(kept)
    # the head trained, and what the client kept is what it trained
    initial = federation.algorithm.initial
    assert not torch.equal(kept["personal/fc.weight"], initial["fc.weight"])
    # a whole round leaves no head in the server's state either
    state, _ = federation.fit_round(1, federation.initial_state())
    assert not set(HEAD) & set(state.params)


def test_fedbn_keeps_every_normalization_array_on_the_client(tiny_recipe):
    cfg = load_recipe(tiny_recipe, ["algorithm.name=fedbn", "model.name=fedavg_cnn_bn", "train.local_steps=2"])
    federation = Federation.build(cfg)
    _, update, kept = fit_one(federation)
    assert not set(NORMS) & set(update.arrays)
    assert set(update.arrays) == set(federation.model.state_dict()) - set(NORMS)
    assert {f"personal/{n}" for n in NORMS} == {k for k in kept if k.startswith("personal/")}
    assert int(kept["personal/bn1.num_batches_tracked"]) == 2  # the client's running statistics moved


def test_personal_arrays_come_back_from_the_state_and_start_from_the_initialization(tiny_recipe):
    federation = Federation.build(load_recipe(tiny_recipe, ["algorithm.name=fedper", "train.local_steps=2"]))
    learner, algorithm = federation.trainer.learner, federation.algorithm
    _, _, kept = fit_one(federation)
    payload = algorithm.payload(2, federation.initial_state(), 0)
    learner.load_arrays(payload.arrays)
    learner.start_round(payload, ClientContext(0, 10, 0, kept))
    assert torch.equal(learner.model.fc.weight, kept["personal/fc.weight"])
    learner.start_round(payload, ClientContext(1, 10, 0, {}))  # a first-time client
    assert torch.equal(learner.model.fc.weight, algorithm.initial["fc.weight"])


def test_patterns_choose_the_personal_arrays(tiny_recipe):
    cfg = load_recipe(tiny_recipe, ["algorithm.name=fedper", "algorithm.personal.patterns=[fc1.*,fc.*]",
                                    "train.local_steps=1"])
    federation = Federation.build(cfg)
    _, update, kept = fit_one(federation)
    assert not {"fc1.weight", "fc1.bias", *HEAD} & set(update.arrays)
    assert {"personal/fc1.weight", "personal/fc.bias"} <= set(kept)


@pytest.mark.parametrize("overrides, key", [
    (["algorithm.name=fedper", "algorithm.personal.patterns=[classifier.*]"], "algorithm.personal.patterns"),
    (["algorithm.name=fedper", "algorithm.personal.patterns=['*']"], "algorithm.personal.patterns"),
    (["algorithm.name=fedbn"], "model.name"),  # fedavg_cnn has no normalization layers
])
def test_bad_personal_layers_are_user_errors_naming_the_key(tiny_recipe, overrides, key):
    with pytest.raises(UserError, match=key):
        Federation.build(load_recipe(tiny_recipe, overrides))


@pytest.mark.parametrize("overrides, key", [
    (["algorithm.personal.patterns=[fc.*]"], "algorithm.personal.patterns"),  # fedavg keeps nothing
    (["algorithm.name=perfedavg", "algorithm.personal.ssl=true"], "algorithm.personal.ssl"),
    (["algorithm.name=perfedavg", "algorithm.meta.variant=second"], "algorithm.meta.variant"),
    (["algorithm.name=ditto", "algorithm.personal.lam=-1"], "algorithm.personal.lam"),
    (["algorithm.name=perfedavg", "algorithm.meta.inner_lr=0"], "algorithm.meta.inner_lr"),
])
def test_bad_personalization_keys_fail_before_anything_runs(tiny_recipe, overrides, key):
    with pytest.raises(UserError, match=key):
        load_recipe(tiny_recipe, overrides)


def test_fedrep_trains_the_head_first_with_the_body_frozen_then_the_body(tiny_recipe, kit):
    """Two steps by hand: the head's step at the initial body, then the body's step
    under the new head; each leaves the other part untouched."""
    cfg = load_recipe(tiny_recipe, ["algorithm.name=fedrep", "train.momentum=0", "train.lr=0.5",
                                    "train.local_steps=1", "algorithm.personal.head_epochs=1"])
    torch.manual_seed(0)
    model = kit.TinyNet()
    algorithm = build_algorithm(cfg)
    learner = algorithm.make_learner(model)
    x, y = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    trainer = kit.vector_trainer(learner, x, y, cfg, algorithm.shared_names(learner))
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    body = [n for n in start if not n.startswith("fc.")]

    def loss_at(params):
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

    lr = 0.5
    params = {n: v.clone().requires_grad_(True) for n, v in start.items()}
    head_grads = torch.autograd.grad(loss_at(params), [params["fc.weight"], params["fc.bias"]])
    after_head = dict(start) | {"fc.weight": start["fc.weight"] - lr * head_grads[0],
                                "fc.bias": start["fc.bias"] - lr * head_grads[1]}
    params = {n: v.clone().requires_grad_(True) for n, v in after_head.items()}
    body_grads = dict(zip(body, torch.autograd.grad(loss_at(params), [params[n] for n in body])))
    expected = after_head | {n: after_head[n] - lr * body_grads[n] for n in body}

    payload = Payload(round=1, arrays={n: start[n] for n in algorithm.shared_names(learner)})
    update, kept = trainer.fit(0, np.arange(6), np.arange(0), payload)
    for name in body:
        torch.testing.assert_close(update.arrays[name], expected[name])
    torch.testing.assert_close(kept["personal/fc.weight"], expected["fc.weight"])
    torch.testing.assert_close(kept["personal/fc.bias"], expected["fc.bias"])
    assert all(p.requires_grad for p in model.parameters()), "nothing stays frozen after the round"


def test_ditto_update_and_personal_model_match_two_hand_computed_sgd_steps(tiny_recipe, kit):
    """w: FedAvg's local SGD; v: SGD on CE(v) + lam/2 ||v - w0||^2 toward the received w0."""
    lr, lam = 0.3, 0.5
    cfg = load_recipe(tiny_recipe, ["algorithm.name=ditto", "train.momentum=0", f"train.lr={lr}",
                                    "train.batch_size=6", "train.local_steps=2", f"algorithm.personal.lam={lam}"])
    torch.manual_seed(1)
    model = nn.Linear(2, 3)
    algorithm = build_algorithm(cfg)
    learner = algorithm.make_learner(model)
    x, y = torch.randn(6, 2), torch.tensor([0, 1, 2, 2, 1, 0])
    trainer = kit.vector_trainer(learner, x, y, cfg, algorithm.shared_names(learner))
    w0, b0 = torch.randn(3, 2), torch.randn(3)
    v0, c0 = torch.randn(3, 2), torch.randn(3)
    state = {"personal/weight": v0, "personal/bias": c0}

    w, b, v, c = w0, b0, v0, c0
    for _ in range(2):
        gw, gb = kit.grads(w, b, x, y)
        gv, gc = kit.grads(v, c, x, y)
        w, b = w - lr * gw, b - lr * gb
        v, c = v - lr * (gv + lam * (v - w0)), c - lr * (gc + lam * (c - b0))

    update, kept = trainer.fit(0, np.arange(6), np.arange(0), Payload(round=1, arrays={"weight": w0, "bias": b0}), state)
    assert set(update.arrays) == {"weight", "bias"}  # the global copy travels, the personal model does not
    torch.testing.assert_close(update.arrays["weight"], w)
    torch.testing.assert_close(update.arrays["bias"], b)
    torch.testing.assert_close(kept["personal/weight"], v)
    torch.testing.assert_close(kept["personal/bias"], c)
    # the personal model is what the client's personalized evaluation uses
    personal = algorithm.personal_weights({"weight": w, "bias": b}, LocalClient(0, kept))
    torch.testing.assert_close(personal["weight"], v)


def test_a_first_time_ditto_client_starts_its_personal_model_from_the_global_one(tiny_recipe, kit):
    cfg = load_recipe(tiny_recipe, ["algorithm.name=ditto", "train.momentum=0", "train.lr=0.3",
                                    "train.batch_size=6", "train.local_steps=1", "algorithm.personal.lam=0.5"])
    model = nn.Linear(2, 3)
    algorithm = build_algorithm(cfg)
    learner = algorithm.make_learner(model)
    x, y = torch.randn(6, 2), torch.tensor([0, 1, 2, 2, 1, 0])
    w0, b0 = torch.randn(3, 2), torch.randn(3)
    update, kept = kit.vector_trainer(learner, x, y, cfg, ["weight", "bias"]).fit(
        0, np.arange(6), np.arange(0), Payload(round=1, arrays={"weight": w0, "bias": b0}))
    # from the same start, with v = w0 the proximal term is zero at the first step: both take the same step
    torch.testing.assert_close(kept["personal/weight"], update.arrays["weight"])
