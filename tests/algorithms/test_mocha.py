"""MOCHA: the closed-form Omega, each client's part of the coupling, its special
cases, per-client work, and a resumed run."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedssl.algorithms.mocha import OMEGA, REPORTED, TASKS, closed_form_omega, coupling, gram_matrix, learned_omega
from fedssl.config.load import load_recipe
from fedssl.errors import UserError
from fedssl.engine.checkpoint import load_checkpoint
from fedssl.engine.federation import Federation
from fedssl.engine.run import run_federation
from fedssl.learners.mocha import MU, WORK
from fedssl.learners.personal import PERSONAL
from fedssl.run_dir import CHECKPOINT

ALL_CLIENTS = ["algorithm.name=mocha", "federation.clients_per_round=6", "train.local_steps=2"]


def numpy_closed_form(rows: np.ndarray) -> np.ndarray:
    """(W W^T)^(1/2) / tr((W W^T)^(1/2)) by numpy's eigendecomposition, tasks as rows."""
    values, vectors = np.linalg.eigh(rows @ rows.T)
    root = vectors @ np.diag(np.sqrt(np.maximum(values, 1e-7))) @ vectors.T
    return root / np.trace(root)


def uniform_omega(m: int, rho: float) -> torch.Tensor:
    """Every pair of tasks equally correlated (rho), trace 1."""
    return ((1 - rho) * torch.eye(m, dtype=torch.float64) + rho * torch.ones(m, m, dtype=torch.float64)) / m


# -- the server's closed form ------------------------------------------------------------------------


def test_omega_of_orthogonal_tasks_is_their_norms_over_the_sum_of_norms():
    # W W^T = diag(9, 16): its square root diag(3, 4), trace 7
    omega = closed_form_omega(gram_matrix([torch.tensor([[3.0, 0.0], [0.0, 4.0]])]))
    assert torch.allclose(omega, torch.tensor([[3 / 7, 0.0], [0.0, 4 / 7]], dtype=torch.float64))


def test_omega_update_equals_the_closed_form_by_eigendecomposition():
    rows = np.array([[1.0, 2.0, 0.0, -1.0], [2.0, 3.5, 0.5, -1.0], [-1.0, 0.0, 2.0, 1.0]])
    want = numpy_closed_form(rows)
    # the rows split over two arrays of other shapes: the Gram matrix sums them
    tasks = [torch.tensor(rows[:, :2]).reshape(3, 2, 1), torch.tensor(rows[:, 2:])]
    got = closed_form_omega(gram_matrix(tasks)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    # its square is W W^T over tr((W W^T)^(1/2))^2, the sum of the square roots of its eigenvalues
    gram = rows @ rows.T
    np.testing.assert_allclose(got @ got, gram / np.sqrt(np.linalg.eigvalsh(gram)).sum() ** 2, rtol=1e-9)
    assert np.trace(got) == pytest.approx(1.0) and np.all(np.linalg.eigvalsh(got) > 0)


def test_tasks_that_have_not_reported_stay_independent():
    rows = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 1.0], [5.0, 5.0, 5.0], [2.0, 0.0, 1.0]], dtype=torch.float64)
    reported = torch.tensor([True, False, True, True])
    omega = learned_omega([rows], reported)
    seen = [0, 2, 3]
    np.testing.assert_allclose(omega[seen][:, seen].numpy(), numpy_closed_form(rows[seen].numpy()) * 3 / 4, atol=1e-12)
    assert torch.equal(omega[1], torch.tensor([0, 0.25, 0, 0], dtype=torch.float64))
    assert float(torch.trace(omega)) == pytest.approx(1.0)


def test_the_server_updates_omega_from_the_tasks_latest_weights_every_omega_every_rounds(tiny_recipe):
    federation = Federation.build(load_recipe(tiny_recipe, [*ALL_CLIENTS, "algorithm.mocha.omega_every=2"]))
    algorithm = federation.algorithm
    state = federation.initial_state()
    assert torch.equal(state.extras[OMEGA], torch.eye(6, dtype=torch.float64) / 6)
    state, _ = federation.fit_round(1, state)
    assert bool(state.extras[REPORTED].all())
    rows = {name: state.extras[TASKS + name] for name in algorithm.coupled}
    assert algorithm.server_round(2, state, None) is state  # round 2: not yet
    updated = algorithm.server_round(3, state, None)
    flat = torch.cat([r.reshape(6, -1) for r in rows.values()], dim=1).double().numpy()
    np.testing.assert_allclose(updated.extras[OMEGA].numpy(), numpy_closed_form(flat), rtol=1e-7, atol=1e-10)


# -- each client's part of the coupling -----------------------------------------------------------------


def test_a_clients_pull_toward_its_anchor_has_the_gradient_of_the_whole_coupling():
    """d/dw_t lambda/2 tr(W^T Omega^-1 W) = mu_t (w_t - a_t), mu_t = lambda P_tt, a_t = sum_j c_j w_j."""
    generator = torch.Generator().manual_seed(0)
    m, lam = 5, 0.3
    basis = torch.randn(m, m, generator=generator, dtype=torch.float64)
    omega = basis @ basis.T + 0.1 * torch.eye(m, dtype=torch.float64)
    omega = omega / torch.trace(omega)
    weights = torch.randn(m, 7, generator=generator, dtype=torch.float64, requires_grad=True)
    (lam / 2 * torch.trace(weights.T @ torch.linalg.inv(omega) @ weights)).backward()
    for task in range(m):
        diagonal, coefficients = coupling(omega, task)
        pull = lam * diagonal * (weights[task] - coefficients @ weights)
        torch.testing.assert_close(pull, weights.grad[task], rtol=1e-10, atol=1e-12)


def test_uniform_coupling_pulls_each_client_toward_the_mean_of_the_other_tasks():
    m, rho = 6, 0.8
    diagonal, coefficients = coupling(uniform_omega(m, rho), 2)
    gamma = (m - 1) * rho / (1 + (m - 2) * rho)
    # Sherman-Morrison: (a I + b 11^T)^-1 = (I - b / (a + m b) 11^T) / a, with a = (1 - rho) / m, b = rho / m
    assert diagonal == pytest.approx(m / (1 - rho) * (1 - rho / (1 + (m - 1) * rho)))
    want = torch.full((m,), gamma / (m - 1), dtype=torch.float64)
    want[2] = 0
    torch.testing.assert_close(coefficients, want)
    assert gamma == pytest.approx(20 / 21)  # toward 1 (the plain mean of the others) as rho -> 1
    # independent tasks (the initial Omega = I/m): no pull toward anyone, weight decay lambda m
    diagonal, coefficients = coupling(torch.eye(m, dtype=torch.float64) / m, 2)
    assert diagonal == pytest.approx(m) and not coefficients.any()


def test_with_uniform_coupling_a_client_trains_on_its_loss_plus_a_proximal_pull_to_the_others_mean(tiny_recipe):
    lam, rho = 0.05, 0.8
    federation = Federation.build(load_recipe(tiny_recipe, [*ALL_CLIENTS, f"algorithm.mocha.lam={lam}"]))
    state, _ = federation.fit_round(1, federation.initial_state())
    state = type(state)(params=state.params, extras=state.extras | {OMEGA: uniform_omega(6, rho)})  # forced
    client = federation.data.clients[0]
    payload = federation.algorithm.payload(2, state, 0)
    gamma = 5 * rho / (1 + 4 * rho)
    mu = lam * 6 / (1 - rho) * (1 - rho / (1 + 5 * rho))
    assert payload.config[MU] == pytest.approx(mu)
    target = {}
    for name in federation.algorithm.coupled:
        rows = state.extras[TASKS + name]
        target[name] = gamma * rows[1:].double().mean(0)
        torch.testing.assert_close(payload.arrays[name].double(), target[name], rtol=1e-6, atol=1e-7)

    learner = federation.trainer.learner
    inner, steps = learner.training_step, []

    def step(batch, batch_idx):  # the loss by hand, from the same weights
        with torch.no_grad():
            expected = F.cross_entropy(learner.model(batch["x"]), batch["y"]) + mu / 2 * sum(
                (p.double() - target[n]).square().sum() for n, p in learner.model.named_parameters())
        out = inner(batch, batch_idx)
        steps.append((float(out.detach()), float(expected)))
        return out

    learner.training_step = step
    kept_before = federation.clients.store.get(0)
    update, kept = federation.trainer.fit(0, client.labeled, client.unlabeled, payload, kept_before)
    assert len(steps) == 2 and all(got == pytest.approx(want, rel=1e-5) for got, want in steps)
    # it started from its own weights, not from the anchor, and keeps what it trained
    assert all(not torch.equal(kept[PERSONAL + n], kept_before[PERSONAL + n]) for n in federation.algorithm.coupled)
    assert all(torch.equal(kept[PERSONAL + n], update.arrays[n]) for n in federation.algorithm.coupled)


def test_before_any_omega_update_a_clients_term_is_weight_decay(tiny_recipe):
    federation = Federation.build(load_recipe(tiny_recipe, [*ALL_CLIENTS, "algorithm.mocha.lam=0.01"]))
    payload = federation.algorithm.payload(1, federation.initial_state(), 3)
    assert payload.config[MU] == pytest.approx(0.01 * 6)
    assert all(not payload.arrays[n].any() for n in federation.algorithm.coupled)  # anchor 0: pull toward the origin


# -- what travels, and what each client runs -----------------------------------------------------------------


def test_coupled_head_over_a_shared_body(tiny_recipe):
    federation = Federation.build(load_recipe(tiny_recipe, [*ALL_CLIENTS, "algorithm.mocha.patterns=[fc.*]"]))
    algorithm = federation.algorithm
    assert algorithm.coupled == ["fc.weight", "fc.bias"]
    state, _ = federation.fit_round(1, federation.initial_state())
    state, _ = federation.fit_round(2, state)
    body = [n for n in state.params if n not in algorithm.coupled]
    payloads = [algorithm.payload(3, state, c) for c in range(2)]
    for name in body:  # the body is averaged and sent alike to everyone
        assert torch.equal(payloads[0].arrays[name], state.params[name])
        assert torch.equal(payloads[0].arrays[name], payloads[1].arrays[name])
    assert not torch.equal(payloads[0].arrays["fc.weight"], payloads[1].arrays["fc.weight"])  # anchors are per client
    assert set(TASKS + n for n in algorithm.coupled) <= set(state.extras)
    assert not any(k.startswith(TASKS + "conv") for k in state.extras)


def test_each_client_runs_its_own_drawn_share_of_the_step_budget(tiny_recipe):
    cfg = load_recipe(tiny_recipe, [*ALL_CLIENTS, "train.local_steps=10", "algorithm.mocha.work_min=0.1",
                                    "algorithm.mocha.work_max=0.9"])
    federation = Federation.build(cfg)
    algorithm, learner = federation.algorithm, federation.trainer.learner
    counted = []
    inner = learner.training_step
    learner.training_step = lambda batch, batch_idx: counted.append(1) or inner(batch, batch_idx)
    state = federation.initial_state()
    shares = {}
    for client_id in range(3):
        payload = algorithm.payload(1, state, client_id)
        shares[client_id] = payload.config[WORK]
        assert shares[client_id] == Federation.build(cfg).algorithm.work(1, client_id)  # from (seed, round, client)
        assert 0.1 <= shares[client_id] <= 0.9
        client = federation.data.clients[client_id]
        counted.clear()
        federation.trainer.fit(client_id, client.labeled, client.unlabeled, payload)
        assert len(counted) == math.ceil(shares[client_id] * 10)
    assert len(set(shares.values())) == 3 and algorithm.work(2, 0) != shares[0]


@pytest.mark.parametrize("override, key", [
    ("algorithm.mocha.patterns=[nothing.*]", "algorithm.mocha.patterns"),
    ("algorithm.mocha.work_min=0", "algorithm.mocha.work_min"),
    ("algorithm.mocha.work_max=0.5", "algorithm.mocha.work_max"),
    ("algorithm.mocha.omega_every=-1", "algorithm.mocha.omega_every"),
])
def test_a_bad_mocha_setting_names_its_key(tiny_recipe, override, key):
    overrides = ["algorithm.name=mocha", override]
    if "work_max" in override:  # below work_min
        overrides.append("algorithm.mocha.work_min=0.8")
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        Federation.build(load_recipe(tiny_recipe, overrides))


def test_mocha_settings_on_another_algorithm_are_refused(tiny_recipe):
    with pytest.raises(UserError, match=r"algorithm\.mocha: only mocha reads it"):
        load_recipe(tiny_recipe, ["algorithm.name=fedper", "algorithm.mocha.lam=0.1"])


# -- a run ------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_resumed_mocha_run_ends_exactly_as_an_uninterrupted_one(tiny_recipe, tmp_path):
    """Omega, every task's weights and every client's own model are in the checkpoint;
    the work drawn per client comes from (seed, round, client)."""
    settings = ["algorithm.name=mocha", "train.local_steps=3", "algorithm.mocha.work_min=0.3",
                "algorithm.mocha.lam=0.01"]
    summary = run_federation(load_recipe(tiny_recipe, [*settings, "federation.rounds=3"]), tmp_path / "whole")
    run_federation(load_recipe(tiny_recipe, [*settings, "federation.rounds=2"]), tmp_path / "resumed")
    resumed = run_federation(load_recipe(tiny_recipe, [*settings, "federation.rounds=3"]), tmp_path / "resumed",
                             resume=True)

    a, b = load_checkpoint(tmp_path / "whole" / CHECKPOINT), load_checkpoint(tmp_path / "resumed" / CHECKPOINT)
    for part in ("params", "extras"):
        assert list(a["server_state"][part]) == list(b["server_state"][part])
        for name, value in a["server_state"][part].items():
            assert torch.equal(value, b["server_state"][part][name]), (part, name)
    assert not torch.equal(a["server_state"]["extras"][OMEGA], torch.eye(6, dtype=torch.float64) / 6)  # it was learned
    assert sorted(a["client_states"]) == sorted(b["client_states"]) and a["client_states"]
    for client_id, kept in a["client_states"].items():
        assert all(torch.equal(v, b["client_states"][client_id][k]) for k, v in kept.items())
    assert resumed["personal_acc"] == summary["personal_acc"] and resumed["global_acc"] == summary["global_acc"]
    assert summary["personal_acc"] != summary["client_acc_mean"]  # scored with the clients' own models
