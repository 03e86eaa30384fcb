"""Central user-level differential privacy: DP-FedAvg's Gaussian mechanism.

McMahan, Ramage, Talwar and Zhang, "Learning Differentially Private Recurrent
Language Models" (ICLR 2018). Each round:

1. clients are Poisson-sampled: each takes part independently with probability
   q = clients_per_round / clients (the loop samples this way when privacy is on,
   because that is what the accountant assumes);
2. each client's delta (returned weights - the global weights it received) is
   clipped to L2 norm C (`clipping`), so one user moves the sum by at most C;
3. the server releases  global + (sum of clipped deltas + N(0, (z C)^2 I)) / m,
   where m = q * clients is the *expected* number of clients: a fixed denominator
   (the paper's f~_f estimator with uniform weights). Dividing by the actual count
   or weighting by example counts would make the sensitivity depend on who was
   sampled and how much data they hold; with m fixed and every weight 1, it is C / m
   whatever happens, including clients dropped as faulty (they add nothing);
4. that private average replaces the cohort's updates: the algorithm's own server
   step (FedAvgM momentum, server lr) applies it as if one client had sent it.
   Post-processing cannot weaken the guarantee.

With `adaptive_clip`, C follows a quantile of the delta norms (Andrew et al.,
NeurIPS 2021); the noised count that drives it is released too and shares the
budget (`clipping.split_noise`), so the accountant still composes one Gaussian
mechanism of multiplier z per round.

Integer arrays (BatchNorm's `num_batches_tracked`) are not averaged: they would
reveal how many steps the clients took, i.e. how much data they hold, without
noise. The global model keeps its own counters.

The noise comes from a PRNG seeded by (seed, round), so that runs and resumptions
reproduce; a deployment should draw it from a cryptographically secure source
(and mind floating-point attacks on Gaussian sampling, Mironov, CCS 2012).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from fedssl.config.schema import PrivacyConfig, RecipeConfig
from fedssl.errors import UserError
from fedssl.messages import Arrays, Update
from fedssl.sampling import clients_per_round
from fedssl.privacy import accountant
from fedssl.privacy.clipping import adapt_clip, clip_to_norm, noisy_unclipped_fraction, split_noise, update_delta

NOISE_STREAM = 0xD9  # the noise's random stream, apart from those of sampling and training
# Noise std added to each weight of the global model per round, z * clip / m. The quickstart
# (FedAvg CNN, 5 clients a round) stayed finite for 8 rounds at 0.004 and turned non-finite in
# round 2 at 0.2 (clip 1, z 1); BENCHMARKS.md's privacy runs diverged at 0.05 and held for 10
# rounds at 0.025. Above 0.02, a margin below what diverged, a run is warned about.
DEFAULT_WEIGHT_NOISE = 0.004
DIVERGING_WEIGHT_NOISE = 0.02

log = logging.getLogger(__name__)


def default_clip(noise_multiplier: float, expected_clients: float) -> float:
    """The clipping bound whose noise on each weight is `DEFAULT_WEIGHT_NOISE` a round:
    the noise std on the average is z * clip / m, so clip = 0.004 * m / z (1 without noise)."""
    return DEFAULT_WEIGHT_NOISE * expected_clients / noise_multiplier if noise_multiplier > 0 else 1.0


def noise_generator(seed: int, round_index: int) -> torch.Generator:
    """The round's noise source, a function of (seed, round) only."""
    state = np.random.SeedSequence([seed, round_index, NOISE_STREAM]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2**63 - 1))


def private_average(deltas: Sequence[Arrays], reference: Arrays, clip: float, noise_std: float,
                    denominator: float, generator: torch.Generator) -> Arrays:
    """reference + (sum of the deltas clipped to `clip` + N(0, noise_std^2)) / denominator,
    for every floating array of `reference`; other arrays keep the reference's value.
    The noise is drawn on the CPU in float32, array by array in `reference`'s order."""
    clipped = [clip_to_norm(d, clip)[0] for d in deltas]
    out = {}
    for name, ref in reference.items():
        if not ref.is_floating_point():
            out[name] = ref
            continue
        total = torch.zeros_like(ref, dtype=torch.float32)
        for delta in clipped:
            total += delta[name].to(torch.float32)
        noise = torch.randn(ref.shape, generator=generator, dtype=torch.float32) * noise_std
        out[name] = ref + ((total + noise.to(ref.device)) / denominator).to(ref.dtype)
    return out


@dataclass
class CentralDP:
    """The per-run state of DP-FedAvg: the current clipping bound and the noise."""

    cfg: PrivacyConfig
    seed: int
    sampling_rate: float  # q
    expected_clients: int  # m, the fixed denominator
    noise_multiplier: float  # z, what the accountant composes
    delta_noise_multiplier: float  # z for the deltas once the adaptive count takes its share
    count_stddev: float | None
    clip: float

    @classmethod
    def build(cls, cfg: RecipeConfig) -> CentralDP | None:
        """None unless `privacy.mechanism` is central (which algorithms allow it:
        `fedssl.algorithms.capabilities.check_compatible`)."""
        privacy = cfg.privacy
        if privacy.mechanism == "none":
            return None
        accountant.make_accountant(privacy.accountant)  # the `privacy` extra, before any round runs
        m = clients_per_round(cfg.federation)
        q = m / cfg.federation.clients
        z = privacy.noise_multiplier
        if privacy.target_epsilon is not None:
            z = accountant.noise_for_epsilon(privacy.target_epsilon, q, cfg.federation.rounds, privacy.delta,
                                             privacy.accountant)
        count_stddev, z_delta = None, z
        if privacy.adaptive_clip:
            count_stddev = privacy.count_stddev if privacy.count_stddev is not None else max(m / 20, z)
            if z > 0 and 2 * count_stddev <= z:
                raise UserError(f"privacy.count_stddev: must exceed noise_multiplier / 2 = {z / 2:.4g} "
                                f"(the count's noise is part of the budget), got {count_stddev}")
            z_delta = split_noise(z, count_stddev)
        clip = privacy.clip if privacy.clip is not None else default_clip(z_delta, m)
        weight_noise = z_delta * clip / m
        if weight_noise > DIVERGING_WEIGHT_NOISE:
            log.warning(
                "privacy: the noise on each weight is %.3g a round (noise multiplier %.3g x clip %.3g / %d clients a "
                "round), above %.3g, where runs have diverged to non-finite weights; leave privacy.clip unset (it then "
                "keeps the noise at %.3g: clip %.3g here) or give privacy.clip <= %.3g, or sample more clients a round",
                weight_noise, z_delta, clip, m, DIVERGING_WEIGHT_NOISE, DEFAULT_WEIGHT_NOISE,
                default_clip(z_delta, m), DIVERGING_WEIGHT_NOISE * m / z_delta)
        return cls(privacy, cfg.seed, q, m, z, z_delta, count_stddev, clip)

    def epsilon(self, rounds: int) -> float:
        """Epsilon at `cfg.delta` after `rounds` rounds."""
        return accountant.epsilon(self.noise_multiplier, self.sampling_rate, rounds, self.cfg.delta, self.cfg.accountant)

    def aggregate(self, updates: Sequence[Update], reference: Arrays, round_index: int) -> tuple[Update, dict[str, float]]:
        """The cohort's updates as one private update, and the round's privacy metrics.
        Adapts the clipping bound for the next round."""
        generator = noise_generator(self.seed, round_index)
        deltas = [update_delta(u.arrays, reference) for u in updates]
        clip = self.clip
        noise_std = self.delta_noise_multiplier * clip
        average = private_average(deltas, reference, clip, noise_std, self.expected_clients, generator)
        metrics = {"dp_clip": clip, "dp_noise_std": noise_std / self.expected_clients,
                   "epsilon": self.epsilon(round_index)}
        if self.cfg.adaptive_clip:
            norms = [clip_to_norm(d, clip)[1] for d in deltas]
            unclipped = noisy_unclipped_fraction(norms, clip, self.count_stddev if self.noise_multiplier > 0 else 0.0,
                                                 self.expected_clients, generator)
            self.clip = adapt_clip(clip, unclipped, self.cfg.target_quantile, self.cfg.clip_lr)
            metrics["dp_unclipped"] = unclipped
        return Update(client_id=-1, arrays=average, num_examples=1), metrics

    def state_dict(self) -> dict[str, Any]:
        return {"clip": self.clip, "noise_multiplier": self.noise_multiplier}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clip = state["clip"]
