"""FedNova's normalized average against hand-computed numbers (a run whose deadline
leaves clients partial work is in tests/simulation/test_syshet.py)."""

import pytest
import torch

from fedssl.algorithms.aggregate import weighted_average
from fedssl.algorithms.fednova import normalized_average, step_norm
from fedssl.messages import Update


def test_fednova_follows_the_papers_formula_on_a_hand_made_example():
    w = {"w": torch.tensor([1.0, 1.0])}
    clients = [({"w": torch.tensor([0.0, 1.0])}, 1, 2.0),  # n=1, tau=2
               ({"w": torch.tensor([1.0, -2.0])}, 3, 6.0)]  # n=3, tau=6
    # p = (1/4, 3/4); d_1 = (1, 0)/2, d_2 = (0, 3)/6; tau_eff = 2/4 + 18/4 = 5
    # w - 5 * (1/4 * (0.5, 0) + 3/4 * (0, 0.5)) = (1 - 0.625, 1 - 1.875)
    out = normalized_average(w, clients)
    assert torch.allclose(out["w"], torch.tensor([0.375, -0.875]))


def test_fednova_is_fedavg_when_every_client_does_equal_work():
    torch.manual_seed(0)
    w = {"a": torch.randn(4, 3), "b": torch.randn(3)}
    updates = [Update(c, {k: v + torch.randn_like(v) for k, v in w.items()}, n) for c, n in enumerate((5, 17, 9))]
    nova = normalized_average(w, [(u.arrays, u.num_examples, step_norm(7, momentum=0.9)) for u in updates])
    fedavg = weighted_average(updates)
    for name in w:
        torch.testing.assert_close(nova[name], fedavg[name], rtol=1e-6, atol=1e-6)


def test_the_step_norm_sums_the_local_step_coefficients():
    assert step_norm(5) == 5
    rho, tau = 0.9, 5  # momentum: a_k = (1 - rho^(tau - k)) / (1 - rho), k = 0..tau-1
    assert step_norm(tau, momentum=rho) == pytest.approx(sum((1 - rho ** (tau - k)) / (1 - rho) for k in range(tau)))
    lr, mu = 0.1, 0.5  # proximal: a_k = (1 - lr mu)^(tau - 1 - k)
    assert step_norm(tau, lr=lr, mu=mu) == pytest.approx(sum((1 - lr * mu) ** (tau - 1 - k) for k in range(tau)))
