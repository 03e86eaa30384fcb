"""Checks of values that the schema's types alone cannot express."""

from __future__ import annotations

from typing import Sequence

from fedssl.config.schema import RecipeConfig
from fedssl.data.federated import LABEL_MODES
from fedssl.data.partition import SCHEMES
from fedssl.data.sources import SOURCE_MODULES
from fedssl.errors import UserError
from fedssl.registry import did_you_mean

AUGMENTATIONS = ("none", "weak", "strong")
OPTIMIZERS = ("sgd", "adam", "adamw")
WANDB_MODES = ("offline", "online", "disabled")
BACKENDS = ("inprocess",)
DEVICES = ("cpu", "cuda", "auto")


def check_choice(value: str, choices: Sequence[str], key: str) -> None:
    """Raise a `UserError` naming `key` unless `value` is one of `choices`."""
    if value not in choices:
        raise UserError(f"{key}: unknown value {value!r}{did_you_mean(value, list(choices))}; choose one of {', '.join(choices)}")


def require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise UserError(f"{key}: {message}")


def validate(cfg: RecipeConfig) -> RecipeConfig:
    """Return `cfg` unchanged, or raise a `UserError` naming the first bad key."""
    fed, train = cfg.federation, cfg.train
    require(bool(cfg.name) and "/" not in cfg.name, "name", f"must be a non-empty name without '/', got {cfg.name!r}")
    require(fed.rounds >= 1, "federation.rounds", f"must be >= 1, got {fed.rounds}")
    require(fed.clients >= 1, "federation.clients", f"must be >= 1, got {fed.clients}")
    if fed.client_fraction is None:
        require(
            1 <= fed.clients_per_round <= fed.clients,
            "federation.clients_per_round",
            f"must be between 1 and federation.clients ({fed.clients}), got {fed.clients_per_round}",
        )
    else:
        require(0 < fed.client_fraction <= 1, "federation.client_fraction", f"must be in (0, 1], got {fed.client_fraction}")
    require(fed.eval_every >= 1, "federation.eval_every", f"must be >= 1, got {fed.eval_every}")
    check_choice(fed.backend, BACKENDS, "federation.backend")
    check_choice(fed.device, DEVICES, "federation.device")
    check_choice(train.optimizer, OPTIMIZERS, "train.optimizer")
    require(train.lr > 0, "train.lr", f"must be > 0, got {train.lr}")
    require(train.batch_size >= 1, "train.batch_size", f"must be >= 1, got {train.batch_size}")
    require(train.local_epochs >= 1 or train.local_steps >= 1, "train.local_epochs", "set local_epochs or local_steps >= 1")
    require(cfg.algorithm.proximal_mu >= 0, "algorithm.proximal_mu", f"must be >= 0, got {cfg.algorithm.proximal_mu}")
    require(0 <= cfg.algorithm.server_momentum < 1, "algorithm.server_momentum", "must be in [0, 1)")
    require(cfg.algorithm.server_lr > 0, "algorithm.server_lr", f"must be > 0, got {cfg.algorithm.server_lr}")
    # Checked here, not only where they are used, so that a typo fails before
    # minutes of data decoding rather than after.
    check_choice(cfg.data.source, list(SOURCE_MODULES), "data.source")
    check_choice(cfg.data.partition.scheme, SCHEMES, "data.partition.scheme")
    check_choice(cfg.data.labels.mode, LABEL_MODES, "data.labels.mode")
    check_choice(cfg.data.augment, AUGMENTATIONS, "data.augment")
    require(cfg.data.channels in (1, 3), "data.channels", f"must be 1 (grayscale) or 3 (RGB), got {cfg.data.channels}")
    require(cfg.data.image_size >= 1, "data.image_size", f"must be >= 1, got {cfg.data.image_size}")
    ssl = cfg.algorithm.ssl
    check_choice(ssl.threshold, ("fixed", "flexmatch"), "algorithm.ssl.threshold")
    require(0 < ssl.tau <= 1, "algorithm.ssl.tau", f"must be in (0, 1], got {ssl.tau}")
    require(ssl.unlabeled_ratio >= 1, "algorithm.ssl.unlabeled_ratio", f"must be >= 1, got {ssl.unlabeled_ratio}")
    require(ssl.server_steps >= 0, "algorithm.ssl.server_steps", f"must be >= 0, got {ssl.server_steps}")
    fm = cfg.algorithm.fedmatch
    require(0 <= fm.tau <= 1, "algorithm.fedmatch.tau", f"must be in [0, 1], got {fm.tau}")
    require(fm.helpers >= 0, "algorithm.fedmatch.helpers", f"must be >= 0, got {fm.helpers}")
    require(fm.helper_every >= 1, "algorithm.fedmatch.helper_every", f"must be >= 1, got {fm.helper_every}")
    require(fm.sparsity >= 0, "algorithm.fedmatch.sparsity", f"must be >= 0, got {fm.sparsity}")
    require(0 <= cfg.data.test_fraction < 1, "data.test_fraction", f"must be in [0, 1), got {cfg.data.test_fraction}")
    check_choice(cfg.logging.wandb.mode, WANDB_MODES, "logging.wandb.mode")
    return cfg
