"""One registry type for every choice a recipe makes by name: a name registered twice
raises, an unknown one is a user error naming the key and the closest name."""

import pytest

from fedssl.algorithms.base import ALGORITHMS
from fedssl.choices import ACCOUNTANTS, AGGREGATORS, CODECS, OPTIMIZERS
from fedssl.config.schema import ALGORITHM_SECTIONS
from fedssl.errors import UserError
from fedssl.ssl.thresholds import THRESHOLDS

REGISTRIES = [ALGORITHMS, ALGORITHM_SECTIONS, THRESHOLDS, AGGREGATORS, ACCOUNTANTS, OPTIMIZERS, CODECS]


@pytest.mark.parametrize("registry", REGISTRIES, ids=lambda r: r.kind)
def test_a_name_registered_twice_raises(registry):
    taken = registry.names()[0]
    with pytest.raises(ValueError, match=f"{registry.kind} '{taken}' is registered twice"):
        registry.register(taken)(object)
    assert registry.get(taken) is not object


@pytest.mark.parametrize("registry", REGISTRIES, ids=lambda r: r.kind)
def test_an_unknown_name_names_the_key_and_the_closest(registry):
    taken = registry.names()[0]
    with pytest.raises(UserError, match=rf"^some\.key: unknown {registry.kind} '{taken}x' \(did you mean '{taken}'\?\)"):
        registry.get(f"{taken}x", key="some.key")
