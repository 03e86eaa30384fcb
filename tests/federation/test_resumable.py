"""Resuming compares the killed run's config with today's: a key fedssl added since
counts as unchanged while it holds its default, and as a change otherwise."""

import pytest

from fedssl.config.load import recipe_defaults
from fedssl.errors import UserError
from fedssl.federation.run import check_resumable


def test_a_key_added_since_the_run_started_is_unchanged_at_its_default():
    current = recipe_defaults()
    saved = recipe_defaults()
    del saved["federation"]["max_update_ratio"]  # as a config written before the key existed
    check_resumable(saved, current)

    current["federation"]["max_update_ratio"] = 10.0
    with pytest.raises(UserError, match=r"federation.max_update_ratio was 1000.0 in the killed run and is 10.0 now"):
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
