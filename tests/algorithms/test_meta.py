"""MAML on torch.func, Per-FedAvg's first-order and Hessian-free steps, and adaptation."""

import torch
from torch import nn

from fedssl.algorithms.meta import MetaConfig
from fedssl.config.schema import TrainConfig
from fedssl.learners.maml import MAML, adapt_arrays, cross_entropy
from fedssl.learners.perfedavg import PerFedAvgLearner

ALPHA, BETA = 0.4, 0.2


def linear_problem(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = nn.Linear(3, 4).to(dtype)
    x = torch.randn(6, 3, dtype=dtype)
    y = torch.tensor([0, 1, 2, 3, 1, 2])
    return model, x, y


def one_step(learner: PerFedAvgLearner, x, y) -> torch.Tensor:
    optimizer = learner.configure_optimizers()
    optimizer.zero_grad()
    loss = learner.training_step({"x": x, "y": y}, 0)
    loss.backward()
    optimizer.step()
    return loss


def test_adapt_is_one_sgd_step_and_leaves_the_module_alone(kit):
    model, x, y = linear_problem()
    w, b = model.weight.detach().clone(), model.bias.detach().clone()
    learner = MAML(model, lr=ALPHA).clone()
    learner.adapt(cross_entropy(x, y))
    gw, gb = kit.grads(w, b, x, y)
    torch.testing.assert_close(learner.params["weight"], w - ALPHA * gw)
    torch.testing.assert_close(learner.params["bias"], b - ALPHA * gb)
    torch.testing.assert_close(learner(x), x @ (w - ALPHA * gw).T + (b - ALPHA * gb))
    assert torch.equal(model.weight, w), "the module's weights are never changed"


def test_hessian_vector_product_exact_and_finite_difference_agree_with_the_hand_formula(kit):
    model, x, y = linear_problem(torch.float64)
    learner = MAML(model, lr=ALPHA).clone()
    vector = {"weight": torch.randn(4, 3, dtype=torch.float64), "bias": torch.randn(4, dtype=torch.float64)}
    hw, hb = kit.hvp(model.weight.detach(), model.bias.detach(), x, vector["weight"], vector["bias"])
    exact = learner.hvp(cross_entropy(x, y), vector)
    torch.testing.assert_close(exact["weight"], hw)
    torch.testing.assert_close(exact["bias"], hb)
    finite = learner.hvp(cross_entropy(x, y), vector, delta=1e-5)
    torch.testing.assert_close(finite["weight"], hw, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(finite["bias"], hb, rtol=1e-6, atol=1e-8)
    # the finite difference is a central one: its error shrinks as delta^2
    coarse = learner.hvp(cross_entropy(x, y), vector, delta=1e-1)
    fine = learner.hvp(cross_entropy(x, y), vector, delta=1e-2)
    assert (fine["weight"] - hw).abs().max() < (coarse["weight"] - hw).abs().max() / 50


def test_first_order_perfedavg_step_matches_the_hand_computation(kit):
    """w <- w - beta * grad_{D'}(w - alpha * grad_D(w)), D and D' the halves of the batch."""
    model, x, y = linear_problem()
    w, b = model.weight.detach().clone(), model.bias.detach().clone()
    gw, gb = kit.grads(w, b, x[:3], y[:3])
    aw, ab = w - ALPHA * gw, b - ALPHA * gb
    ow, ob = kit.grads(aw, ab, x[3:], y[3:])
    learner = PerFedAvgLearner(model, TrainConfig(lr=BETA), MetaConfig(variant="fo", inner_lr=ALPHA))
    loss = one_step(learner, x, y)
    torch.testing.assert_close(model.weight.detach(), w - BETA * ow)
    torch.testing.assert_close(model.bias.detach(), b - BETA * ob)
    # the reported loss is the outer loss at the adapted weights
    torch.testing.assert_close(loss.detach(), nn.functional.cross_entropy(x[3:] @ aw.T + ab, y[3:]))


def test_hessian_free_perfedavg_step_matches_the_hand_computation(kit):
    """g = grad_{D'}(w~) - alpha * H_{D''}(w) grad_{D'}(w~), D, D', D'' the thirds of
    the batch; the finite-difference Hessian-vector product against the hand formula."""
    model, x, y = linear_problem(torch.float64)
    w, b = model.weight.detach().clone(), model.bias.detach().clone()
    gw, gb = kit.grads(w, b, x[:2], y[:2])
    aw, ab = w - ALPHA * gw, b - ALPHA * gb
    ow, ob = kit.grads(aw, ab, x[2:4], y[2:4])
    hw, hb = kit.hvp(w, b, x[4:], ow, ob)
    learner = PerFedAvgLearner(model, TrainConfig(lr=BETA), MetaConfig(variant="hf", inner_lr=ALPHA, hf_delta=1e-5))
    one_step(learner, x, y)
    torch.testing.assert_close(model.weight.detach(), w - BETA * (ow - ALPHA * hw), rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(model.bias.detach(), b - BETA * (ob - ALPHA * hb), rtol=1e-7, atol=1e-9)
    # and it is not the first-order step: the Hessian term matters here
    assert not torch.allclose(model.weight.detach(), w - BETA * ow, atol=1e-6)


def test_adaptation_from_arrays_never_changes_them(kit):
    model = kit.TinyNet(batch_norm=True)
    arrays = {n: v.clone() for n, v in model.state_dict().items()}
    before = {n: v.clone() for n, v in arrays.items()}
    x, y = torch.randn(8, 3), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    adapted = adapt_arrays(model, arrays, [(x, y), (x, y)], lr=0.5)
    for name, value in before.items():
        assert torch.equal(arrays[name], value), name
    assert not torch.equal(adapted["fc.weight"], arrays["fc.weight"])
    assert not torch.equal(adapted["norm.running_mean"], arrays["norm.running_mean"])  # trained in training mode
    assert set(adapted) == set(arrays)
    assert adapt_arrays(model, arrays, [], lr=0.5)["fc.weight"].equal(arrays["fc.weight"])  # no data: the global model
