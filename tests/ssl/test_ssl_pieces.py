"""The pure SSL pieces do what their docstrings and papers say, on hand-built inputs."""

import math

import pytest
import torch
import torch.nn.functional as F

from fedssl.ssl.alignment import align, update_running_mean
from fedssl.ssl.pseudo_labels import masked_cross_entropy, pseudo_labels
from fedssl.ssl.thresholds import UNSELECTED, FixedThreshold, FlexMatchThreshold

PROBS = torch.tensor([
    [0.70, 0.20, 0.10],  # class 0, confidence 0.7
    [0.30, 0.40, 0.30],  # class 1, confidence 0.4
    [0.05, 0.05, 0.90],  # class 2, confidence 0.9
    [0.25, 0.50, 0.25],  # class 1, confidence exactly 0.5
])


# -- pseudo_labels ---------------------------------------------------------------


def test_pseudo_labels_keep_the_arg_max_and_its_confidence():
    labels, confidence, _ = pseudo_labels(PROBS, 0.6)
    assert labels.tolist() == [0, 1, 2, 1]
    assert confidence.tolist() == pytest.approx([0.7, 0.4, 0.9, 0.5])


def test_scalar_threshold_masks_rows_below_it():
    _, _, mask = pseudo_labels(PROBS, 0.6)
    assert mask.tolist() == [True, False, True, False]


def test_a_confidence_that_reaches_the_threshold_is_kept():
    _, _, mask = pseudo_labels(PROBS, 0.5)  # 0.5 is exact in binary
    assert mask.tolist() == [True, False, True, True]


def test_per_class_thresholds_apply_the_threshold_of_the_predicted_class():
    thresholds = torch.tensor([0.8, 0.3, 0.95])
    labels, _, mask = pseudo_labels(PROBS, thresholds)
    # row 0: 0.7 < 0.8 (class 0); row 1: 0.4 >= 0.3 (class 1); row 2: 0.9 < 0.95 (class 2); row 3: 0.5 >= 0.3
    assert labels.tolist() == [0, 1, 2, 1]
    assert mask.tolist() == [False, True, False, True]


def test_threshold_zero_keeps_everything_and_one_keeps_nothing_unsaturated():
    assert pseudo_labels(PROBS, 0.0)[2].all()
    assert not pseudo_labels(PROBS, 1.0)[2].any()
    assert pseudo_labels(PROBS, torch.zeros(3))[2].all()


# -- masked_cross_entropy ----------------------------------------------------------


def test_masked_cross_entropy_equals_the_hand_computed_value():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    labels = torch.tensor([0, 2, 2])
    mask = torch.tensor([True, False, True])
    ce0 = -math.log(math.exp(2) / (math.exp(2) + 2))
    ce2 = -math.log(math.exp(3) / (math.exp(3) + 2))
    # averaged over all three rows, not over the two kept ones
    assert float(masked_cross_entropy(logits, labels, mask)) == pytest.approx((ce0 + ce2) / 3, rel=1e-6)


def test_masked_rows_contribute_nothing_not_even_gradient():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 50.0, 0.0]], requires_grad=True)
    labels = torch.tensor([0, 2])  # row 1 is confidently wrong: a huge loss were it counted
    mask = torch.tensor([True, False])
    loss = masked_cross_entropy(logits, labels, mask)
    expected = F.cross_entropy(logits[:1].detach(), labels[:1]) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert torch.equal(logits.grad[1], torch.zeros(3))
    assert logits.grad[0].abs().sum() > 0


def test_all_masked_out_is_zero_loss_and_empty_batch_is_zero_with_a_graph():
    logits = torch.randn(4, 3, requires_grad=True)
    assert masked_cross_entropy(logits, torch.tensor([0, 1, 2, 0]), torch.zeros(4, dtype=torch.bool)).item() == 0.0
    empty = masked_cross_entropy(logits[:0], torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.bool))
    assert empty.item() == 0.0
    empty.backward()  # still differentiable, so a step on an empty batch does not crash


# -- thresholds ------------------------------------------------------------------------


def test_fixed_threshold_is_tau_and_keeps_no_state():
    fixed = FixedThreshold(0.95)
    fixed.update(torch.tensor([0]), torch.tensor([1]), torch.tensor([0.99]))
    assert fixed.thresholds() == 0.95
    assert fixed.state() == {}


def mapped(beta: float, tau: float) -> float:
    """FlexMatch's convex mapping M(beta) = beta / (2 - beta), scaled by tau."""
    return tau * beta / (2 - beta)


def test_flexmatch_thresholds_after_warm_up_normalize_by_the_largest_class():
    # counts per class 5, 2, 1; 2 samples unused (< 5): no warm-up, beta = counts / 5
    selected = torch.tensor([0, 0, 0, 0, 1, 1, 2, UNSELECTED, UNSELECTED, 0])
    flex = FlexMatchThreshold(0.9, num_classes=3, num_unlabeled=10, selected=selected)
    expected = [mapped(1.0, 0.9), mapped(0.4, 0.9), mapped(0.2, 0.9)]
    assert flex.thresholds().tolist() == pytest.approx(expected)
    assert flex.thresholds()[0] == pytest.approx(0.9)  # the best-learned class gets tau itself


def test_flexmatch_thresholds_during_warm_up_normalize_by_the_unused_count():
    # counts 1, 1, 0; 8 samples unused (> 1): warm-up, beta = counts / 8
    selected = torch.tensor([0, 1] + [UNSELECTED] * 8)
    flex = FlexMatchThreshold(0.9, num_classes=3, num_unlabeled=10, selected=selected)
    expected = [mapped(1 / 8, 0.9), mapped(1 / 8, 0.9), 0.0]
    assert flex.thresholds().tolist() == pytest.approx(expected)


def test_flexmatch_starts_with_every_threshold_at_zero():
    flex = FlexMatchThreshold(0.95, num_classes=4, num_unlabeled=6)
    assert flex.selected.tolist() == [UNSELECTED] * 6
    assert flex.thresholds().tolist() == [0.0] * 4


def test_flexmatch_thresholds_grow_with_the_class_count_and_never_exceed_tau():
    # beta -> M(beta) is increasing and M(1) = 1
    thresholds = []
    for count in range(0, 6):
        selected = torch.tensor([0] * count + [1] * 5)
        thresholds.append(float(FlexMatchThreshold(0.8, 2, len(selected), selected).thresholds()[0]))
    assert thresholds == sorted(thresholds)
    assert max(thresholds) == pytest.approx(0.8)


def test_flexmatch_update_records_only_confident_predictions():
    flex = FlexMatchThreshold(0.9, num_classes=3, num_unlabeled=5)
    flex.update(torch.tensor([0, 1, 2]), torch.tensor([2, 2, 1]), torch.tensor([0.95, 0.5, 0.99]))
    assert flex.selected.tolist() == [2, UNSELECTED, 1, UNSELECTED, UNSELECTED]
    # a later confident prediction replaces the earlier one; an unconfident one does not erase it
    flex.update(torch.tensor([0, 2]), torch.tensor([1, 0]), torch.tensor([0.97, 0.3]))
    assert flex.selected.tolist() == [1, UNSELECTED, 1, UNSELECTED, UNSELECTED]


def test_flexmatch_state_round_trips_and_a_stale_state_is_ignored():
    flex = FlexMatchThreshold(0.9, num_classes=3, num_unlabeled=4)
    flex.update(torch.tensor([3]), torch.tensor([2]), torch.tensor([0.99]))
    kept = flex.state()["flexmatch_selected"]
    again = FlexMatchThreshold(0.9, 3, 4, kept)
    assert again.selected.tolist() == [UNSELECTED, UNSELECTED, UNSELECTED, 2]
    assert torch.equal(again.thresholds(), flex.thresholds())
    # the state is a copy: updating the live threshold does not change what was kept
    flex.update(torch.tensor([0]), torch.tensor([1]), torch.tensor([0.99]))
    assert kept.tolist() == [UNSELECTED, UNSELECTED, UNSELECTED, 2]
    # kept for another unlabeled set size: start over
    assert FlexMatchThreshold(0.9, 3, 7, kept).selected.tolist() == [UNSELECTED] * 7


# -- distribution alignment ---------------------------------------------------------------


def test_alignment_matches_the_formula_and_rows_sum_to_one():
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.8, 0.1, 0.1]])
    running_mean = torch.tensor([0.5, 0.25, 0.25])
    target = torch.full((3,), 1 / 3)
    aligned = align(probs, running_mean, target)
    raw = probs * target / running_mean
    assert torch.allclose(aligned, raw / raw.sum(dim=1, keepdim=True))
    assert torch.allclose(aligned.sum(dim=1), torch.ones(2))


def test_alignment_moves_the_mean_prediction_toward_the_target():
    torch.manual_seed(0)
    logits = torch.randn(256, 4) + torch.tensor([2.0, 0.5, 0.0, -1.0])  # skewed toward class 0
    probs = logits.softmax(dim=1)
    target = torch.full((4,), 0.25)
    aligned = align(probs, probs.mean(dim=0), target)
    before = (probs.mean(dim=0) - target).abs().sum()
    after = (aligned.mean(dim=0) - target).abs().sum()
    assert after < before
    assert aligned.mean(dim=0)[0] < probs.mean(dim=0)[0]  # the over-predicted class loses mass
    assert torch.allclose(aligned.sum(dim=1), torch.ones(256))
    assert (aligned >= 0).all()
    # a non-uniform target is followed as well
    skewed = torch.tensor([0.1, 0.2, 0.3, 0.4])
    toward = align(probs, probs.mean(dim=0), skewed)
    assert (toward.mean(dim=0) - skewed).abs().sum() < (probs.mean(dim=0) - skewed).abs().sum()


def test_alignment_with_a_matching_running_mean_is_the_identity():
    probs = torch.tensor([[0.2, 0.8], [0.6, 0.4]])
    target = torch.tensor([0.3, 0.7])
    assert torch.allclose(align(probs, target.clone(), target), probs)


def test_running_mean_is_an_exponential_moving_average_of_batch_means():
    running = torch.tensor([0.5, 0.5])
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])  # batch mean 0.75, 0.25
    updated = update_running_mean(running, probs, momentum=0.9)
    assert updated.tolist() == pytest.approx([0.9 * 0.5 + 0.1 * 0.75, 0.9 * 0.5 + 0.1 * 0.25])
    assert float(updated.sum()) == pytest.approx(1.0)
