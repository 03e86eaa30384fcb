"""(epsilon, delta) of a DP-FedAvg run, from Google's `dp-accounting`.

One round of DP-FedAvg (McMahan, Ramage, Talwar and Zhang, "Learning Differentially
Private Recurrent Language Models", ICLR 2018) is a sampled Gaussian mechanism on
users: every client takes part independently with probability q (Poisson sampling,
which the in-process loop performs when privacy is on), and the sum of the clipped
deltas gets Gaussian noise of std z * clip. The neighbouring relation is adding or
removing one client's whole data set (user-level DP). Rounds compose; the
accountant is Renyi DP (Mironov 2017; Mironov, Talwar and Zhang 2019) or the
privacy loss distribution (Koskela et al. 2020; Doroshenko et al. 2022).
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

from fedssl.choices import ACCOUNTANTS
from fedssl.extras import require
from fedssl.tracking.quiet import quiet_logger

if TYPE_CHECKING:
    import dp_accounting


def _dp_accounting():
    """dp-accounting, the `privacy` extra; imported when an epsilon is first needed."""
    return require("dp_accounting", "privacy")


@ACCOUNTANTS.register("rdp")
def _rdp() -> dp_accounting.PrivacyAccountant:
    return require("dp_accounting.rdp", "privacy").RdpAccountant()


@ACCOUNTANTS.register("pld")
def _pld() -> dp_accounting.PrivacyAccountant:
    return require("dp_accounting.pld", "privacy").PLDAccountant()


def round_event(noise_multiplier: float, sampling_rate: float) -> dp_accounting.DpEvent:
    """What one round releases, as a dp-accounting event."""
    dp = _dp_accounting()
    return dp.PoissonSampledDpEvent(sampling_rate, dp.GaussianDpEvent(noise_multiplier))


def make_accountant(kind: str) -> dp_accounting.PrivacyAccountant:
    """A fresh accountant under add-or-remove-one-client neighbouring."""
    return ACCOUNTANTS.get(kind, key="privacy.accountant")()


@functools.lru_cache(maxsize=4096)
def epsilon(noise_multiplier: float, sampling_rate: float, rounds: int, delta: float, kind: str = "rdp") -> float:
    """Epsilon at `delta` after `rounds` rounds; inf without noise, 0 before any round."""
    if rounds <= 0 or sampling_rate == 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    accountant = make_accountant(kind)
    # dp-accounting's RDP accountant warns, once per fractional order at large noise
    # multipliers, that a series did not converge; the epsilon stays a valid bound.
    with quiet_logger("absl"):
        accountant.compose(round_event(noise_multiplier, sampling_rate), rounds)
        return float(accountant.get_epsilon(delta))


def noise_for_epsilon(target_epsilon: float, sampling_rate: float, rounds: int, delta: float, kind: str = "rdp") -> float:
    """The noise multiplier (to within 1e-3) whose `rounds` rounds spend at most,
    and about, `target_epsilon`.

    dp-accounting's calibration runs Brent's method on epsilon(z) - target within a
    bracket, falls back to bisection, and guarantees that the z it returns does not
    exceed the target. The PLD accountant is slow at small z, so its bracket is
    [z_rdp / 4, z_rdp], where z_rdp is the RDP calibration: RDP's epsilon bounds
    the PLD one from above, so z_rdp is always enough.
    """
    dp = _dp_accounting()

    def event(z: float) -> dp_accounting.DpEvent:
        return dp.SelfComposedDpEvent(round_event(z, sampling_rate), rounds)

    bracket = dp.LowerEndpointAndGuess(1e-2, 2.0)
    if kind == "pld":
        upper = noise_for_epsilon(target_epsilon, sampling_rate, rounds, delta, "rdp")
        bracket = dp.ExplicitBracketInterval(upper / 4, upper)
    # dp-accounting's RDP accountant warns, once per fractional order at large noise
    # multipliers, that a series did not converge; the epsilon stays a valid bound.
    with quiet_logger("absl"):
        return float(dp.calibrate_dp_mechanism(
            lambda: make_accountant(kind), event, target_epsilon, delta, bracket_interval=bracket, tol=1e-3,
        ))
