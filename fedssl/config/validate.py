"""Checks of values that the schema's types alone cannot express."""

from __future__ import annotations

from typing import Any, Sequence

from fedssl.choices import ACCOUNTANTS, AGGREGATORS, CODECS, OPTIMIZERS
from fedssl.config.schema import RecipeConfig
from fedssl.errors import UserError
from fedssl.sampling import clients_per_round, held_out_clients
from fedssl.registry import did_you_mean
from fedssl.ssl.thresholds import THRESHOLDS

PRECISIONS = ("32", "bf16-mixed", "16-mixed")  # Lightning's names; the device is checked where it is known
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")  # fedssl.inprocess.client_data.training_layout
WANDB_MODES = ("offline", "online", "disabled")
BACKENDS = ("inprocess", "flower")
PRIVACY_MECHANISMS = ("none", "central")
DEVICES = ("cpu", "cuda", "auto")
CONCURRENCY = ("sequential", "vmap", "auto")  # fedssl.inprocess.vmap
CHANNEL_MODELS = ("independent", "gilbert_elliott")  # fedssl.simulation.channel
CHANNEL_STRATEGIES = ("drop", "mean", "fill")
# The input and output sizes fedssl builds a network for, from a recipe, a checkpoint
# someone sent or an exported model's description (20000 pixels a side once asked for TBs).
IMAGE_SIZES = (8, 1024)
CHANNELS = (1, 3)
MAX_CLASSES = 100_000
# The seed reaches numpy (default_rng, SeedSequence), torch.manual_seed and
# albumentations/random; numpy's legacy RandomState, which libraries still seed, takes
# 32 bits, torch 64, and none a negative number. 0..2**32-1 is what every path accepts.
MAX_SEED = 2**32 - 1


def check_choice(value: str, choices: Sequence[str], key: str) -> None:
    """Raise a `UserError` naming `key` unless `value` is one of `choices`."""
    if value not in choices:
        raise UserError(f"{key}: unknown value {value!r}{did_you_mean(value, list(choices))}; choose one of {', '.join(choices)}")


def require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise UserError(f"{key}: {message}")


def validate_sections(cfg: RecipeConfig) -> None:
    """Each algorithm section's own checks (its `check(cfg)`, beside its keys)."""
    for name in sorted(vars(cfg.algorithm)):
        check = getattr(getattr(cfg.algorithm, name), "check", None)
        if callable(check):
            check(cfg)


def validate_robustness(cfg: RecipeConfig) -> None:
    """Robust aggregation and faulty clients (`federation.robust`): the aggregator must have enough updates."""
    robust, key = cfg.federation.robust, "federation.robust"
    AGGREGATORS.get(robust.aggregator, key=f"{key}.aggregator")
    require(0 <= robust.trim_fraction < 0.5, f"{key}.trim_fraction", f"must be in [0, 0.5), got {robust.trim_fraction}")
    require(robust.byzantine >= 0, f"{key}.byzantine", f"must be >= 0, got {robust.byzantine}")
    require(robust.krum_select >= 0, f"{key}.krum_select", f"must be >= 0, got {robust.krum_select}")
    require(robust.round_retries >= 0, f"{key}.round_retries", f"must be >= 0, got {robust.round_retries}")
    require(robust.max_update_ratio > 0, f"{key}.max_update_ratio", f"must be > 0, got {robust.max_update_ratio}")
    clip = robust.update_clip
    require(clip.multiple >= 0, f"{key}.update_clip.multiple", f"must be >= 0 (0: no clipping), got {clip.multiple}")
    require(clip.window >= 1, f"{key}.update_clip.window", f"must be >= 1, got {clip.window}")
    per_round = clients_per_round(cfg.federation)
    require(1 <= robust.min_clients <= per_round, f"{key}.min_clients",
            f"must be between 1 and the {per_round} clients sampled per round, got {robust.min_clients}")
    if robust.aggregator in ("krum", "multi_krum"):
        require(per_round >= 2 * robust.byzantine + 3, f"{key}.byzantine",
                f"krum with f={robust.byzantine} needs at least 2f + 3 = {2 * robust.byzantine + 3} clients per round, "
                f"got {per_round}")
        require(robust.krum_select <= per_round - robust.byzantine, f"{key}.krum_select",
                f"multi-krum averages at most n - f = {per_round - robust.byzantine} updates, got {robust.krum_select}")


def codec_stages(entries: Sequence[Any], key: str) -> list[Any]:
    """The codecs (fedssl/codecs) a recipe's list names, built in order, or a
    `UserError` naming the entry and key: an unknown codec, a parameter it does not
    take or a bad value, a stage after a final one, a shaped stage not first."""
    stages: list[Any] = []
    for i, entry in enumerate(entries):
        where = f"{key}[{i}]"
        cls = CODECS.get(entry.name, key=f"{where}.name")
        params = {k: v for k, v in vars(entry).items() if k != "name" and v is not None}
        for param in params:
            require(param in cls.params, f"{where}.{param}",
                    f"codec {entry.name} takes {', '.join(cls.params) or 'no parameters'}")
        problem = cls.check_params(params)
        require(problem is None, f"{where}.{(problem or '').split(':')[0]}", (problem or "").partition(": ")[2])
        if stages:
            require(not stages[-1].terminal, f"{where}.name",
                    f"{stages[-1].name} is final (its output is no longer a float vector); nothing can follow it")
            require(not cls.first_only, f"{where}.name", f"{entry.name} needs the array's own shape and must come first")
        stages.append(cls(**params))
    return stages


def validate_links(cfg: RecipeConfig) -> None:
    """Codec pipelines and the lossy uplink channel."""
    fed = cfg.federation
    codec_stages(fed.uplink.codecs, "federation.uplink.codecs")
    down = codec_stages(fed.downlink.codecs, "federation.downlink.codecs")
    require(all(stage.stateless for stage in down), "federation.downlink.codecs",
            "error feedback keeps state per receiver, and the server keeps none per client (set error_feedback: false)")
    ch, key = fed.uplink.channel, "federation.uplink.channel"
    check_choice(ch.model, CHANNEL_MODELS, f"{key}.model")
    check_choice(ch.strategy, CHANNEL_STRATEGIES, f"{key}.strategy")
    for name in ("loss", "p_good_bad", "p_bad_good", "loss_good", "loss_bad"):
        value = getattr(ch, name)
        require(0 <= value <= 1, f"{key}.{name}", f"must be a probability in [0, 1], got {value}")
    require(ch.loss < 1, f"{key}.loss", "must be < 1 (a link that loses every packet delivers nothing)")
    require(ch.model != "gilbert_elliott" or ch.p_good_bad + ch.p_bad_good > 0, f"{key}.p_bad_good",
            "p_good_bad + p_bad_good must be > 0 (the chain needs a stationary state)")
    require(ch.packet_bytes >= 1, f"{key}.packet_bytes", f"must be >= 1, got {ch.packet_bytes}")
    require(ch.retransmissions >= 0, f"{key}.retransmissions", f"must be >= 0, got {ch.retransmissions}")
    if ch.strategy == "mean" and lossy(ch):
        require(fed.robust.aggregator == "mean" and cfg.privacy.mechanism == "none", f"{key}.strategy",
                "mean averages each coordinate over the clients it reached; it needs federation.robust.aggregator=mean and "
                "no privacy.mechanism (use drop or fill)")


def lossy(channel: Any) -> bool:
    """Whether the uplink channel can lose a packet."""
    if channel.model == "independent":
        return channel.loss > 0
    return channel.loss_bad > 0 and channel.p_good_bad > 0 or channel.loss_good > 0


def validate_privacy(cfg: RecipeConfig) -> None:
    p = cfg.privacy
    check_choice(p.mechanism, PRIVACY_MECHANISMS, "privacy.mechanism")
    ACCOUNTANTS.get(p.accountant, key="privacy.accountant")
    require(p.clip is None or p.clip > 0, "privacy.clip", f"must be > 0, got {p.clip}")
    require(0 < p.target_quantile < 1, "privacy.target_quantile", f"must be in (0, 1), got {p.target_quantile}")
    require(p.clip_lr > 0, "privacy.clip_lr", f"must be > 0, got {p.clip_lr}")
    require(p.count_stddev is None or p.count_stddev > 0, "privacy.count_stddev", f"must be > 0, got {p.count_stddev}")
    require(p.noise_multiplier >= 0, "privacy.noise_multiplier", f"must be >= 0, got {p.noise_multiplier}")
    require(p.target_epsilon is None or p.target_epsilon > 0, "privacy.target_epsilon",
            f"must be > 0, got {p.target_epsilon}")
    if p.mechanism == "none":
        return
    population = cfg.federation.clients
    # A delta of 1/n would allow a mechanism that publishes one of the n clients' data outright.
    require(0 < p.delta < 1 / population, "privacy.delta",
            f"must be in (0, 1/federation.clients = {1 / population:.3g}), and far below it; got {p.delta}")
    require(cfg.federation.robust.aggregator == "mean", "privacy.mechanism",
            f"{p.mechanism} DP clips and averages the deltas itself; it cannot be combined with "
            f"federation.robust.aggregator={cfg.federation.robust.aggregator}")
    # A retry redraws from the clients that did not fail: not the Poisson sampling the accountant assumes.
    require(cfg.federation.robust.round_retries == 0, "federation.robust.round_retries",
            f"must be 0 with privacy.mechanism={p.mechanism}: a redrawn round is not the Poisson sampling "
            "the privacy accountant assumes")


def validate_model_input(cfg: RecipeConfig) -> None:
    """The input a network is built for: also checked on a checkpoint's stored recipe."""
    require(cfg.data.channels in CHANNELS, "data.channels", f"must be 1 (grayscale) or 3 (RGB), got {cfg.data.channels}")
    low, high = IMAGE_SIZES
    require(low <= cfg.data.image_size <= high, "data.image_size", f"must be from {low} to {high}, got {cfg.data.image_size}")


def check_run_name(name: str, key: str = "name") -> str:
    """`name` if it names one directory inside `output_dir` (never `output_dir`
    itself, its parent or a path elsewhere), else a `UserError` naming `key`."""
    require(name not in ("", ".", "..") and not any(c in name for c in "/\\\0"), key,
            f"must be a directory name: not empty, '.' or '..', without '/' or '\\', got {name!r}")
    # 255 bytes: the longest folder name of the common file systems (ext4, XFS, Btrfs, APFS)
    require(len(name.encode()) <= 255, key, f"must be at most 255 bytes long (a folder name), got {len(name.encode())}")
    return name


def validate(cfg: RecipeConfig) -> RecipeConfig:
    """Return `cfg` unchanged, or raise a `UserError` naming the first bad key."""
    fed, train = cfg.federation, cfg.train
    check_run_name(cfg.name)
    require(0 <= cfg.seed <= MAX_SEED, "seed", f"must be in 0..{MAX_SEED} (2**32 - 1), got {cfg.seed}")
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
    evaluation = fed.evaluation
    require(evaluation.eval_every >= 1, "federation.evaluation.eval_every", f"must be >= 1, got {evaluation.eval_every}")
    held = evaluation.holdout_clients
    require(held >= 0 and (held < 1 or held == int(held)), "federation.evaluation.holdout_clients",
            f"must be a share in [0, 1) or a whole count, got {held}")
    require(len(held_out_clients(fed, cfg.seed)) + clients_per_round(fed) <= fed.clients,
            "federation.evaluation.holdout_clients",
            f"holding out {len(held_out_clients(fed, cfg.seed))} of {fed.clients} clients leaves fewer than the "
            f"{clients_per_round(fed)} a round samples")
    require(evaluation.holdout_steps >= 0, "federation.evaluation.holdout_steps",
            f"must be >= 0, got {evaluation.holdout_steps}")
    check_choice(fed.backend, BACKENDS, "federation.backend")
    require(fed.flower.num_cpus > 0, "federation.flower.num_cpus", f"must be > 0, got {fed.flower.num_cpus}")
    require(fed.flower.num_gpus >= 0, "federation.flower.num_gpus", f"must be >= 0, got {fed.flower.num_gpus}")
    require(fed.flower.round_timeout > 0, "federation.flower.round_timeout", f"must be > 0, got {fed.flower.round_timeout}")
    require(fed.flower.connect_timeout > 0, "federation.flower.connect_timeout", f"must be > 0, got {fed.flower.connect_timeout}")
    execution = fed.execution
    check_choice(execution.device, DEVICES, "federation.execution.device")
    check_choice(execution.concurrency, CONCURRENCY, "federation.execution.concurrency")
    require(execution.concurrent_clients >= 1, "federation.execution.concurrent_clients",
            f"must be >= 1, got {execution.concurrent_clients}")
    workers = execution.workers
    require(workers == "auto" or (workers.isdigit() and workers.isascii()), "federation.execution.workers",
            f"must be auto or a count of worker processes >= 0, got {workers!r}")
    OPTIMIZERS.get(train.optimizer, key="train.optimizer")
    check_choice(train.precision, PRECISIONS, "train.precision")
    check_choice(train.memory_format, MEMORY_FORMATS, "train.memory_format")
    # Lightning would train at bf16-mixed instead; federation.execution.device: auto is checked where it resolves.
    require(not (train.precision == "16-mixed" and execution.device == "cpu"), "train.precision",
            "16-mixed (float16 autocast with loss scaling) needs a CUDA device, and federation.execution.device is cpu; "
            "use bf16-mixed or 32 there")
    require(train.lr > 0, "train.lr", f"must be > 0, got {train.lr}")
    require(train.batch_size >= 1, "train.batch_size", f"must be >= 1, got {train.batch_size}")
    require(train.local_epochs >= 1 or train.local_steps >= 1, "train.local_epochs", "set local_epochs or local_steps >= 1")
    require(cfg.algorithm.proximal_mu >= 0, "algorithm.proximal_mu", f"must be >= 0, got {cfg.algorithm.proximal_mu}")
    require(0 <= cfg.algorithm.server_momentum < 1, "algorithm.server_momentum", "must be in [0, 1)")
    require(cfg.algorithm.server_lr > 0, "algorithm.server_lr", f"must be > 0, got {cfg.algorithm.server_lr}")
    # data.source, data.partition.scheme, data.labels.mode and data.augment are
    # checked by the data package, before it decodes anything (`load_source`).
    require(cfg.data.augment_backend in ("albumentations", "torch"), "data.augment_backend",
            f"must be albumentations or torch, got {cfg.data.augment_backend!r}")
    validate_model_input(cfg)
    ssl = cfg.algorithm.ssl
    THRESHOLDS.get(ssl.threshold, key="algorithm.ssl.threshold")
    require(0 < ssl.tau <= 1, "algorithm.ssl.tau", f"must be in (0, 1], got {ssl.tau}")
    require(ssl.unlabeled_ratio >= 1, "algorithm.ssl.unlabeled_ratio", f"must be >= 1, got {ssl.unlabeled_ratio}")
    require(ssl.server_steps >= 0, "algorithm.ssl.server_steps", f"must be >= 0, got {ssl.server_steps}")
    require(execution.states_in_memory >= 0, "federation.execution.states_in_memory",
            f"must be >= 0, got {execution.states_in_memory}")
    require(evaluation.eval_clients >= 0, "federation.evaluation.eval_clients",
            f"must be >= 0 (0: every client), got {evaluation.eval_clients}")
    validate_sections(cfg)
    validate_robustness(cfg)
    validate_privacy(cfg)
    validate_links(cfg)
    require(0 <= cfg.data.test_fraction < 1, "data.test_fraction", f"must be in [0, 1), got {cfg.data.test_fraction}")
    check_choice(cfg.logging.wandb.mode, WANDB_MODES, "logging.wandb.mode")
    return cfg
