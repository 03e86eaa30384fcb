"""Registries of choices that config validates but whose entries live above it.

The recipe's validation (fedssl.config.validate) names an unknown choice at once,
with the closest name; the entries are registered where they are implemented,
which the registry imports when it is first asked (config imports none of them).
"""

from __future__ import annotations

from typing import Any, Callable

from fedssl.registry import Registry

# federation.robust.aggregator: how FedAvg-family servers combine updates (fedssl/algorithms/robust.py)
AGGREGATORS: Registry[Callable[..., Any]] = Registry("aggregator", imports=("fedssl.algorithms.robust",))
# privacy.accountant: the privacy accountants (fedssl/privacy/accountant.py)
ACCOUNTANTS: Registry[Callable[[], Any]] = Registry("accountant", imports=("fedssl.privacy.accountant",))
# train.optimizer: the client optimizers (fedssl/learners/supervised.py)
OPTIMIZERS: Registry[Callable[..., Any]] = Registry("optimizer", imports=("fedssl.learners.supervised",))
# federation.uplink.codecs / federation.downlink.codecs: update codecs (fedssl/codecs/)
CODECS: Registry[type] = Registry("codec", entry_points="fedssl.codecs", imports=("fedssl.codecs",))
