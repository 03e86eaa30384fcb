"""The accountant against dp-accounting's own numbers, and the noise calibration."""

import math

import dp_accounting
import pytest
from dp_accounting import pld, rdp

from fedssl.privacy.accountant import epsilon, noise_for_epsilon


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["rdp", "pld"])
def test_epsilon_is_dp_accountings_own_for_the_same_mechanism_and_steps(kind):
    # Poisson-sampled Gaussian, q = 5/10, z = 1.1, 7 rounds, delta = 1e-3, composed
    # here with dp-accounting's API directly.
    accountant = rdp.RdpAccountant() if kind == "rdp" else pld.PLDAccountant()
    event = dp_accounting.PoissonSampledDpEvent(0.5, dp_accounting.GaussianDpEvent(1.1))
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, 7))
    expected = accountant.get_epsilon(1e-3)
    assert epsilon(1.1, 0.5, 7, 1e-3, kind) == pytest.approx(expected, rel=1e-9)
    assert 0 < expected < 100


def test_epsilon_grows_with_rounds_and_sampling_and_shrinks_with_noise():
    by_round = [epsilon(1.0, 0.3, t, 1e-5) for t in range(1, 6)]
    assert all(a < b for a, b in zip(by_round, by_round[1:]))
    assert epsilon(2.0, 0.3, 5, 1e-5) < epsilon(1.0, 0.3, 5, 1e-5)
    assert epsilon(1.0, 0.1, 5, 1e-5) < epsilon(1.0, 0.3, 5, 1e-5)
    assert epsilon(1.0, 0.3, 5, 1e-3) < epsilon(1.0, 0.3, 5, 1e-5)  # a larger delta buys a smaller epsilon


def test_no_noise_is_no_privacy_and_no_round_costs_nothing():
    assert epsilon(0.0, 0.5, 3, 1e-5) == math.inf
    assert epsilon(1.0, 0.5, 0, 1e-5) == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("kind, target", [("rdp", 3.0), ("rdp", 1.0), ("pld", 3.0)])
def test_target_epsilon_gives_a_noise_multiplier_just_within_it(kind, target):
    z = noise_for_epsilon(target, 0.5, 10, 1e-3, kind)
    spent = epsilon(z, 0.5, 10, 1e-3, kind)
    assert spent <= target
    assert spent == pytest.approx(target, rel=0.01)
    assert epsilon(z * 0.98, 0.5, 10, 1e-3, kind) > target  # 2% less noise would overspend
