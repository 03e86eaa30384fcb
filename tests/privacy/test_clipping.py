"""Clipping, adaptive clipping and DP-FedAvg's private average, against hand-computed numbers."""

import math

import pytest
import torch

from fedssl.privacy.clipping import (adapt_clip, clip_to_norm, global_norm, noisy_unclipped_fraction, split_noise,
                                     update_delta)
from fedssl.privacy.mechanism import noise_generator, private_average


def test_delta_is_taken_over_floating_arrays_only():
    reference = {"w": torch.tensor([1.0, 2.0]), "bn.num_batches_tracked": torch.tensor(3)}
    update = {"w": torch.tensor([4.0, 6.0]), "bn.num_batches_tracked": torch.tensor(9)}
    delta = update_delta(update, reference)
    assert list(delta) == ["w"]
    assert torch.equal(delta["w"], torch.tensor([3.0, 4.0]))


def test_clipping_bounds_the_norm_over_all_arrays_together():
    delta = {"a": torch.tensor([3.0]), "b": torch.tensor([[4.0]])}  # norm 5
    clipped, norm = clip_to_norm(delta, 1.0)
    assert norm == 5.0
    assert global_norm(clipped) == pytest.approx(1.0)
    assert torch.allclose(clipped["a"], torch.tensor([0.6])) and torch.allclose(clipped["b"], torch.tensor([[0.8]]))
    short, _ = clip_to_norm(delta, 10.0)  # within the bound: unchanged
    assert torch.equal(short["a"], delta["a"]) and torch.equal(short["b"], delta["b"])
    zero, norm = clip_to_norm({"a": torch.zeros(3)}, 1.0)
    assert norm == 0.0 and torch.equal(zero["a"], torch.zeros(3))


def test_adaptive_clip_moves_toward_the_target_quantile():
    # Andrew et al.: C * exp(-eta (b - gamma)); all deltas unclipped -> shrink, none -> grow.
    assert adapt_clip(2.0, 1.0, 0.5, 0.2) == pytest.approx(2.0 * math.exp(-0.1))
    assert adapt_clip(2.0, 0.0, 0.5, 0.2) == pytest.approx(2.0 * math.exp(0.1))
    assert adapt_clip(2.0, 0.5, 0.5, 0.2) == 2.0


def test_the_unclipped_count_without_noise_is_the_exact_share():
    generator = torch.Generator().manual_seed(0)
    # 3 of 4 norms within the bound, fixed denominator 4: (3 - 2) / 4 + 1/2 = 3/4
    assert noisy_unclipped_fraction([0.1, 0.5, 1.0, 3.0], 1.0, 0.0, 4, generator) == pytest.approx(0.75)
    # fixed denominator 8 (expected clients) with the same 4: (1 - ... ) = (3*0.5 - 0.5) / 8 + 0.5
    assert noisy_unclipped_fraction([0.1, 0.5, 1.0, 3.0], 1.0, 0.0, 8, generator) == pytest.approx(1.0 / 8 + 0.5)


def test_the_count_and_the_deltas_share_the_noise_budget():
    z, sigma_b = 1.0, 2.0
    z_delta = split_noise(z, sigma_b)
    assert z_delta ** -2 + (2 * sigma_b) ** -2 == pytest.approx(z ** -2)
    assert z_delta > z  # the deltas need more noise once the count spends part of the budget
    with pytest.raises(ValueError):
        split_noise(1.0, 0.5)  # 2 sigma_b must exceed z


def test_private_average_without_noise_is_the_clipped_sum_over_the_fixed_denominator():
    reference = {"w": torch.tensor([1.0, 1.0]), "n": torch.tensor(7)}
    deltas = [{"w": torch.tensor([3.0, 4.0])}, {"w": torch.tensor([0.3, 0.4])}]  # norms 5 and 0.5
    out = private_average(deltas, reference, clip=1.0, noise_std=0.0, denominator=4, generator=noise_generator(0, 1))
    # (0.6, 0.8) + (0.3, 0.4) = (0.9, 1.2), / 4 = (0.225, 0.3)
    assert torch.allclose(out["w"], torch.tensor([1.225, 1.3]))
    assert out["n"] is reference["n"]  # counters are not averaged under DP


def test_private_average_noise_has_the_stated_std_and_depends_on_seed_and_round_only():
    reference = {"w": torch.zeros(200_000)}
    out = private_average([], reference, clip=1.0, noise_std=2.0, denominator=5, generator=noise_generator(3, 7))
    assert float(out["w"].std()) == pytest.approx(2.0 / 5, rel=0.01)
    again = private_average([], reference, 1.0, 2.0, 5, noise_generator(3, 7))
    other = private_average([], reference, 1.0, 2.0, 5, noise_generator(3, 8))
    assert torch.equal(out["w"], again["w"]) and not torch.equal(out["w"], other["w"])
