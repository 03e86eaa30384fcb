"""The default norm bound on updates (Sun et al. 2019), by hand-computed numbers:
clipping, the median, the window and its checkpoint. A run with a rogue client is
tests/engine/test_rogue.py."""

import pytest
import torch

from fedssl.config.load import load_recipe
from fedssl.errors import UserError
from fedssl.engine.federation import Federation
from fedssl.engine.update_bound import RoundClip, UpdateBound, clip_update, median_bound
from fedssl.messages import Update

SENT = {"w": torch.tensor([1.0, 1.0]), "b": torch.tensor([0.0]), "n": torch.tensor(3)}


def test_an_update_longer_than_the_bound_is_scaled_down_to_it_around_what_was_sent():
    # w moved by (3, 4), b by 0: norm 5; to 2.5 it is halved, the counter kept
    update = Update(7, {"w": torch.tensor([4.0, 5.0]), "b": torch.tensor([0.0]), "n": torch.tensor(9)}, 5)
    clipped, norm = clip_update(update, SENT, 2.5)
    assert norm == 5.0
    assert torch.equal(clipped.arrays["w"], torch.tensor([2.5, 3.0])) and torch.equal(clipped.arrays["n"], torch.tensor(9))
    assert clipped.num_examples == 5 and clipped.client_id == 7
    same, norm = clip_update(update, SENT, 5.0)  # within the bound: untouched
    assert same is update and norm == 5.0


def test_a_sparse_delta_is_clipped_by_scaling_its_values():
    update = Update(7, {"w/index": torch.tensor([0, 1]), "w/value": torch.tensor([3.0, 4.0])}, 5)
    clipped, norm = clip_update(update, SENT, 1.0)
    assert norm == 5.0
    assert torch.allclose(clipped.arrays["w/value"], torch.tensor([0.6, 0.8]))
    assert torch.equal(clipped.arrays["w/index"], torch.tensor([0, 1]))


def test_the_bound_is_a_multiple_of_the_median_norm():
    assert median_bound([1.0, 9.0, 2.0], 3.0) == 6.0
    assert median_bound([1.0, 2.0, 3.0, 1e30], 3.0) == 7.5  # an even count: the mean of the middle two


def moved(client, norm, examples=5):
    """An update that moved w by `norm` along its first axis."""
    return Update(client, {"w": SENT["w"] + torch.tensor([norm, 0.0]), "b": SENT["b"], "n": SENT["n"]}, examples)


def test_without_history_a_round_holds_its_updates_and_bounds_them_by_their_own_median():
    clip = RoundClip(None, 3.0)
    assert clip.admit(moved(0, 1.0), SENT, "m0") == [] and clip.admit(moved(1, 2.0), SENT) == []
    clip.admit(moved(2, 0.0, examples=0), SENT)  # did not train: no evidence
    clip.admit(moved(3, 990.0), SENT)
    out = clip.finish()
    assert [u.client_id for u, _ in out] == [0, 1, 2, 3] and out[0][1] == "m0"
    assert clip.bound == 6.0  # 3 x median(1, 2, 990)
    assert out[3][0].arrays["w"].tolist() == [7.0, 1.0]  # 1 + 6
    assert clip.clipped == 1 and clip.norms == [1.0, 2.0, 990.0]


def test_with_history_updates_are_clipped_as_they_come_by_the_recent_rounds():
    bound = UpdateBound(multiple=2.0, window=2)
    bound.record([1.0, 1.0])
    bound.record([4.0])
    bound.record([2.0, 3.0])  # the window keeps the last two rounds: median(4, 2, 3) = 3
    clip = bound.start_round()
    assert clip.bound == 6.0
    (update, _), = clip.admit(moved(0, -60.0), SENT)  # a sign-flipped rogue
    assert update.arrays["w"].tolist() == [-5.0, 1.0] and clip.clipped == 1
    assert clip.finish() == []
    off = UpdateBound(multiple=0.0, window=5).start_round()
    (update, _), = off.admit(moved(0, 1e30), SENT)
    assert update.arrays["w"][0] == 1e30 and off.norms == [] and off.clipped == 0


def test_the_window_survives_a_checkpoint_and_a_malformed_one_is_refused():
    bound = UpdateBound(3.0, 5)
    bound.record([1.0, 2.0])
    bound.record([3.0])
    restored = UpdateBound(3.0, 5)
    restored.load_state_dict(bound.state_dict())
    assert list(restored.rounds) == [[1.0, 2.0], [3.0]]
    for bad in [{"norms": torch.tensor([1.0, float("nan")], dtype=torch.float64), "counts": torch.tensor([2])},
                {"norms": torch.tensor([1.0], dtype=torch.float64), "counts": torch.tensor([2])}, [1.0]]:
        with pytest.raises(ValueError, match="update_clip"):
            restored.load_state_dict(bad)


def test_under_dp_the_dp_clip_is_the_bound(tiny_recipe):
    federation = Federation.build(load_recipe(tiny_recipe, ["privacy.mechanism=central", "privacy.delta=0.01",
                                                            "privacy.clip=1.0"]))
    assert not federation.bound.enabled


@pytest.mark.parametrize("key, value", [("multiple", -1), ("multiple", "nan"), ("window", 0)])
def test_the_bound_settings_are_checked(tiny_recipe, key, value):
    with pytest.raises(UserError, match=f"federation.robust.update_clip.{key}"):
        load_recipe(tiny_recipe, [f"federation.robust.update_clip.{key}={value}"])
