"""Resuming compares the killed run's config with today's: a key fedssl added since
counts as unchanged while it holds its default, and as a change otherwise."""

import pytest

from fedssl.config.load import recipe_defaults, saved_defaults
from fedssl.errors import UserError
from fedssl.engine.run import check_resumable


def test_a_key_added_since_the_run_started_is_unchanged_at_its_default():
    current = recipe_defaults()
    saved = recipe_defaults()
    del saved["federation"]["robust"]["max_update_ratio"]  # as a config written before the key existed
    check_resumable(saved, current)

    current["federation"]["robust"]["max_update_ratio"] = 10.0
    with pytest.raises(UserError, match=r"federation.robust.max_update_ratio was 1000.0 in the killed run and is 10.0 now"):
        check_resumable(saved, current)


def test_a_changed_key_is_refused_and_a_resumable_one_is_not():
    saved, current = recipe_defaults(), recipe_defaults()
    current["federation"]["rounds"] = saved["federation"]["rounds"] + 5
    check_resumable(saved, current)
    current["seed"] = saved["seed"] + 1
    with pytest.raises(UserError, match="seed was"):
        check_resumable(saved, current)


def test_privacy_settings_are_compared_only_under_dp():
    saved, current = recipe_defaults(), recipe_defaults()
    saved["privacy"]["clip"] = 1.0  # an older default, inert without DP
    check_resumable(saved, current)
    saved["privacy"]["mechanism"] = current["privacy"]["mechanism"] = "central"
    with pytest.raises(UserError, match="privacy.clip was 1.0"):
        check_resumable(saved, current)


def test_a_run_from_before_drop_last_existed_resumes_as_it_trained():
    """train.drop_last defaults to true, but a run started before the key existed
    trained on every short batch: resuming it under the new default would change
    its batches mid-run, so it resumes only with drop_last false."""
    assert recipe_defaults()["train"]["drop_last"] is True and saved_defaults()["train"]["drop_last"] is False
    saved, current = recipe_defaults(), recipe_defaults()
    del saved["train"]["drop_last"]  # a config written before the key existed
    with pytest.raises(UserError, match=r"train.drop_last was False in the killed run and is True now \(it started "
                                        r"before fedssl had train.drop_last.*resume it with train.drop_last=false\)"):
        check_resumable(saved, current)
    current["train"]["drop_last"] = False
    check_resumable(saved, current)
    # A run that started with the key resumes under its own value, as any other key.
    saved["train"]["drop_last"] = True
    with pytest.raises(UserError, match=r"train.drop_last was True in the killed run and is False now$"):
        check_resumable(saved, current)
