"""The typed recipe schema: one dataclass per component.

A recipe YAML is merged onto `recipe_schema()` (OmegaConf structured config), so an
unknown key or a wrong type is caught before anything runs. Every field's comment
is its documentation; the recipe reference is generated from the same words.

An algorithm's own keys live beside it: its module registers a dataclass in
`ALGORITHM_SECTIONS` (e.g. `algorithm.fedmatch` in fedssl/algorithms/fedmatch.py),
and `recipe_schema()` adds every registered section under `algorithm`. A section
may define `check(self, cfg)`, which validation calls.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Optional

from fedssl.registry import Registry

# Sections of `algorithm:` declared by algorithm modules: fedssl's own (every module
# of fedssl.algorithms) and those other packages declare in the `fedssl.algorithms`
# entry point group. The modules are imported when the schema is first built.
ALGORITHM_SECTIONS: Registry[type] = Registry("algorithm section", entry_points="fedssl.algorithms",
                                              imports=("fedssl.algorithms",))


@dataclass
class PartitionConfig:
    scheme: str = "iid"  # how the training pool is split across clients: iid | dirichlet | shards | natural | draw (cross-device: each client draws samples_per_client samples from the pool, seeded by (seed, client); clients may share samples, and there may be more clients than samples)
    alpha: float = 0.5  # dirichlet: label-skew concentration; smaller is more skewed
    classes_per_client: int = 2  # shards: how many classes each client holds
    min_samples: int = 10  # dirichlet: redraw until every client holds at least this many samples
    samples_per_client: int = 20  # draw: how many distinct samples each client draws from the pool (its local test split included)
    local_test_fraction: float = 0.2  # share of each client's samples kept as its local test split


@dataclass
class LabelsConfig:
    mode: str = "all"  # who holds labels: all | client | server | mixed
    per_class: int = 0  # client: labeled samples per class per client (0: use `fraction`)
    fraction: float = 1.0  # client: share of each client's training samples that is labeled
    server_per_class: int = 0  # server/mixed: labeled samples per class held by the server only
    labeled_clients: float = 0.5  # mixed: share of clients that are fully labeled; the rest hold none


@dataclass
class DataConfig:
    source: str = "synthetic_faces"  # synthetic_faces | fer2013 | folder | idx
    path: str = ""  # fer2013: the CSV file; folder: the root of class subfolders; idx: the folder of IDX files
    image_size: int = 48  # side length images are resized to (folder); synthetic faces are drawn at this size
    channels: int = 1  # 1 (grayscale) or 3 (RGB); folder images are converted to this
    num_samples: int = 20000  # synthetic_faces: how many images to draw
    num_identities: int = 100  # synthetic_faces: how many different people
    test_fraction: float = 0.2  # share of the pool held out as the server test set when the source has no test split
    skip_bad: bool = False  # skip (and count) malformed rows/images instead of stopping with an error
    augment: str = "none"  # augmentation of supervised training batches: none | weak | strong
    augment_backend: str = "albumentations"  # who draws augmented views: albumentations (per image, on the CPU) | torch (a batch at a time, on the training device; about 10x faster, accuracy not yet shown equal: BENCHMARKS.md)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    labels: LabelsConfig = field(default_factory=LabelsConfig)


@dataclass
class ModelConfig:
    name: str = "fedavg_cnn"  # any timm model name, or one of fedssl's small FL CNNs
    pretrained: bool = False  # load weights from `checkpoint` (never from the network)
    checkpoint: str = ""  # local weights file (.pth/.safetensors) used when pretrained is true
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments for timm.create_model
    mean: list[float] = field(default_factory=list)  # input normalization: per-channel mean of images scaled to [0, 1], one value or one per channel (empty: the pretrained weights' own, from timm's data config, when pretrained; else 0.5)
    std: list[float] = field(default_factory=list)  # input normalization: per-channel std, as mean (empty and not pretrained: 0.5, i.e. inputs in [-1, 1])


@dataclass
class TrainConfig:
    optimizer: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.01  # client learning rate
    momentum: float = 0.0  # sgd momentum
    weight_decay: float = 0.0  # L2 penalty of the client optimizer
    batch_size: int = 32  # client mini-batch size
    drop_last: bool = True  # end each pass over a client's data at its last full batch (as PFLlib and DataLoader(drop_last=True)): the short remainder waits for the next pass's shuffle, and a client smaller than one batch still trains on it; false: the short batch is a step, and a one-image step can swing a personal model (docs/personalization.md)
    local_epochs: int = 1  # passes over the client's labeled data per round
    local_steps: int = 0  # if > 0, a fixed number of SGD steps per round instead of epochs
    memory_format: str = "auto"  # layout of the weights while a client trains: auto (channels_last on a CPU, where oneDNN's convolutions make a step 1.1-1.5x faster; contiguous on CUDA, unmeasured there) | channels_last | contiguous; updates, states and evaluation see contiguous weights either way
    precision: str = "32"  # client training precision, set by Lightning: 32 | bf16-mixed (CPU or CUDA autocast) | 16-mixed (CUDA only; float16 autocast with loss scaling)


@dataclass
class SSLConfig:
    unlabeled_ratio: int = 7  # mu: unlabeled images per labeled image in a step (FixMatch: 7)
    lambda_u: float = 1.0  # weight of the unlabeled loss
    threshold: str = "fixed"  # pseudo-label confidence threshold rule: fixed | flexmatch (class-wise adaptive) | any rule registered in fedssl.ssl.thresholds.THRESHOLDS
    tau: float = 0.95  # confidence threshold (FlexMatch: its upper bound)
    distribution_alignment: bool = False  # align predicted class distributions to the labeled one (ReMixMatch)
    server_steps: int = 0  # labels at the server: server fine-tuning steps on its labeled set per round (SemiFL)


@dataclass
class AlgorithmConfig:
    name: str = "fedavg"  # the registered algorithm: fedavg | fedprox | fixmatch | fedmatch | semifl | fedper | fedrep | fedbn | ditto | perfedavg | reptile | any algorithm another package registers
    proximal_mu: float = 0.0  # FedProx proximal term weight (mu); 0 disables it
    server_lr: float = 1.0  # server learning rate applied to the averaged update
    server_momentum: float = 0.0  # FedAvgM server momentum (beta); 0 is plain FedAvg
    ssl: SSLConfig = field(default_factory=SSLConfig)
    # + one section per algorithm module that declares one (`ALGORITHM_SECTIONS`):
    # algorithm.fedmatch, algorithm.personal, algorithm.meta, ... (see `recipe_schema`)


@dataclass
class FlowerConfig:
    num_cpus: float = 1.0  # simulation: CPU cores each client (ClientApp) reserves; fewer clients run at once with more
    num_gpus: float = 0.0  # simulation: GPU share of each client, e.g. 0.25 runs four clients per GPU
    round_timeout: float = 600.0  # seconds the server waits for a round's updates; a client silent by then is dropped
    connect_timeout: float = 120.0  # seconds the server waits for nodes holding every partition to connect


@dataclass
class SystemConfig:
    profile: str = "none"  # clients' devices (docs/heterogeneity.md): none (no simulated time) | uniform (every client `speed`, `uplink`, `downlink`) | mobile (log-normal spread around those medians, drawn from the seed) | trace (read from the CSV `trace`)
    speed: float = 100.0  # uniform/mobile: local training speed in samples per second (mobile: the median)
    uplink: float = 1.0e6  # uniform/mobile: client -> server bandwidth in bytes per second (mobile: the median)
    downlink: float = 4.0e6  # uniform/mobile: server -> client bandwidth in bytes per second (mobile: the median)
    online: float = 1.0  # uniform/mobile: probability a sampled client is online in a round (offline ones do not answer)
    trace: str = ""  # trace: CSV with header client,speed,uplink,downlink,online (one row per client)
    policy: str = "wait_all"  # how a round ends: wait_all | deadline (drop clients not done by `deadline`) | overselect (sample more, keep the first clients_per_round to finish) | partial (each client does the local steps that fit `deadline`)
    deadline: float = 0.0  # deadline/partial: the round's deadline in simulated seconds
    overselect: float = 0.0  # overselect: extra share of clients sampled, e.g. 0.3 samples 30% more


@dataclass
class CodecConfig:
    name: str = "identity"  # a registered codec: identity | mask | subsample | low_rank | hadamard | quantize | topk (see docs/communication.md)
    fraction: Optional[float] = None  # mask, subsample, topk: share of coordinates kept, in (0, 1] (default 0.1)
    bits: Optional[int] = None  # quantize: bits per coordinate, 1 | 2 | 4 | 8 (default 2)
    rank: Optional[int] = None  # low_rank: rank k of the factorization (default 4)
    error_feedback: Optional[bool] = None  # topk: keep what was not sent on the client and add it to its next update (default true)


@dataclass
class ChannelConfig:
    loss: float = 0.0  # independent: probability that a packet is lost; 0 with model independent is a perfect link
    model: str = "independent"  # packet losses: independent (each with probability loss) | gilbert_elliott (bursty, two-state Markov chain)
    p_good_bad: float = 0.05  # gilbert_elliott: probability of moving from the good to the bad state after a packet
    p_bad_good: float = 0.5  # gilbert_elliott: probability of moving from the bad to the good state after a packet
    loss_good: float = 0.0  # gilbert_elliott: loss probability in the good state
    loss_bad: float = 1.0  # gilbert_elliott: loss probability in the bad state
    packet_bytes: int = 1024  # payload bytes per packet; an array is cut into packets of whole elements
    retransmissions: int = 0  # times a lost packet is sent again (r); it is lost only if every attempt is
    strategy: str = "drop"  # what the server does with an update that lost packets (Su et al. 2023): drop (the whole update) | mean (average each coordinate over the clients it reached) | fill (missing coordinates take the global values the client was sent)


@dataclass
class UplinkConfig:
    codecs: list[CodecConfig] = field(default_factory=list)  # the pipeline each client's update (its delta from the weights it was sent) goes through, e.g. [{name: hadamard}, {name: quantize, bits: 2}]; empty: the weights travel as they are
    channel: ChannelConfig = field(default_factory=ChannelConfig)  # a simulated lossy link for the updates


@dataclass
class DownlinkConfig:
    codecs: list[CodecConfig] = field(default_factory=list)  # the pipeline the weights sent for training go through (the weights themselves, not a delta); stateless codecs only; empty: sent as they are


@dataclass
class UpdateClipConfig:
    multiple: float = 1.5  # each update's move from the weights it was sent is clipped to this x the median norm of the updates accepted in the last `window` rounds (in the first, of the round's own), against a rogue client's scaled update (Sun et al. 2019); 0: no clipping. Off under privacy.mechanism=central, whose clip bounds every update
    window: int = 5  # rounds of accepted updates whose norms set the bound


@dataclass
class ExecutionConfig:
    device: str = "cpu"  # torch device for training: cpu | cuda | auto
    concurrency: str = "auto"  # how a round's clients train: sequential (one after another) | vmap (together, torch.func.vmap over stacked weights; where the algorithm or model cannot, one at a time, logged) | auto (vmap on CUDA, else sequential)
    concurrent_clients: int = 64  # vmap: at most this many clients train at once (bounds device memory)
    workers: str = "auto"  # CPU worker processes that train a round's clients, one torch thread each: a count (0 or 1: in this process) | auto (min(cores, clients per round) on a CPU of 2+ cores when a round holds 1,000+ SGD steps, else 0)
    states_in_memory: int = 100  # clients whose kept state (personal layers, ...) stays in memory; the rest are spilled to disk
    state_dir: str = ""  # where spilled client states go, one file per client (default: a temporary directory)


@dataclass
class RobustConfig:
    aggregator: str = "mean"  # how FedAvg-family servers combine updates: mean (example-weighted) | median | trimmed_mean | krum | multi_krum
    trim_fraction: float = 0.1  # trimmed_mean: share of the largest and of the smallest values dropped per coordinate (beta)
    byzantine: int = 1  # krum, multi_krum: f, the attackers tolerated; needs clients_per_round >= 2f + 3
    krum_select: int = 0  # multi_krum: m, how many best-scored updates are averaged (0: n - f)
    min_clients: int = 1  # a round needs this many usable updates, else it is retried (round_retries) or the run stops
    round_retries: int = 0  # times a round with too few usable updates is redrawn from the clients that did not fail
    max_update_ratio: float = 1000.0  # an update whose distance from the weights it was sent exceeds this x max(their norm, 1) is dropped and counted (e.g. a rogue x1e30 update)
    update_clip: UpdateClipConfig = field(default_factory=UpdateClipConfig)  # the norm bound on every update, from the recent updates' norms; clipped updates are counted in clipped_clients


@dataclass
class EvaluationConfig:
    eval_every: int = 1  # evaluate the global model every k rounds (and always after the last)
    eval_clients: int = 0  # clients scored on their own test split at each evaluation: 0 every client; n > 0 a fresh sample of n training clients each evaluation (and every held-out client), for populations too large to score whole
    holdout_clients: float = 0.0  # clients that never train, scored at evaluation as unseen people (unseen_acc): a share of federation.clients if < 1, else a count; drawn from the seed
    holdout_steps: int = 20  # steps each held-out client adapts on its labeled images (head fine-tune, or the algorithm's own adaptation) before it is scored on the rest of its data
    linear_probe: bool = False  # evaluate: linear_acc, a logistic-regression probe on the global model's frozen features of the training clients' labeled split, scored on the server test set


@dataclass
class FederationConfig:
    backend: str = "inprocess"  # where clients run: inprocess (one process) | flower (Flower's simulation engine)
    rounds: int = 10  # communication rounds
    clients: int = 10  # population size
    clients_per_round: int = 10  # clients sampled each round (ignored when client_fraction is set)
    client_fraction: Optional[float] = None  # share of the population sampled each round, in (0, 1]
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)  # how this process trains a round's clients
    robust: RobustConfig = field(default_factory=RobustConfig)  # what the server does against faulty and rogue clients
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)  # when and on whom the global model is scored
    flower: FlowerConfig = field(default_factory=FlowerConfig)  # backend=flower: client resources and timeouts
    system: SystemConfig = field(default_factory=SystemConfig)  # device profiles, simulated time and round policies
    uplink: UplinkConfig = field(default_factory=UplinkConfig)  # compressed updates and a lossy link, client to server (docs/communication.md)
    downlink: DownlinkConfig = field(default_factory=DownlinkConfig)  # compressed weights, server to client


@dataclass
class PrivacyConfig:
    mechanism: str = "none"  # none | central: user-level DP-FedAvg (clipped client deltas, Gaussian noise on their average)
    clip: Optional[float] = None  # L2 bound on each client's delta (its change to the global arrays); with adaptive_clip, the first bound. Default: the bound that keeps the noise on each weight at 0.004 a round, 0.004 * m / z (m clients a round)
    adaptive_clip: bool = False  # track a quantile of the delta norms (Andrew et al. 2021) instead of a fixed bound
    target_quantile: float = 0.5  # adaptive_clip: share of deltas the bound should leave unclipped
    clip_lr: float = 0.2  # adaptive_clip: geometric step of the bound per round
    count_stddev: Optional[float] = None  # adaptive_clip: noise std of the unclipped count (default: max(m / 20, noise_multiplier))
    noise_multiplier: float = 1.0  # z: noise std on the delta sum = z * clip (0: clipping only, no privacy)
    target_epsilon: Optional[float] = None  # if set, the noise multiplier is computed so the whole run spends this epsilon
    delta: float = 1e-5  # delta of (epsilon, delta); must be below 1 / federation.clients, keep it far below
    accountant: str = "rdp"  # rdp | pld: dp-accounting's Renyi DP or privacy loss distribution accountant


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline (no account or network; `wandb sync` later) | online | disabled
    project: str = "fedssl"  # W&B project
    entity: Optional[str] = None  # W&B team or user (default: your default entity)
    group: Optional[str] = None  # runs of one recipe family share a group (default: the recipe name)
    job_type: str = "train"  # W&B job type, to tell training from evaluation or sweeps
    tags: list[str] = field(default_factory=list)  # W&B tags


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress: bool = True  # a progress bar over rounds showing the latest accuracy


@dataclass
class RecipeConfig:
    name: str = "run"  # run name; the run directory is output_dir/name
    seed: int = 0  # one seed for data, partition, sampling, initialization and training
    output_dir: str = "runs"  # where run directories are created
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def recipe_schema() -> type[RecipeConfig]:
    """`RecipeConfig` with every registered algorithm section under `algorithm`."""
    return _schema(tuple((name, ALGORITHM_SECTIONS.get(name)) for name in ALGORITHM_SECTIONS.names()))


@lru_cache(maxsize=None)
def _schema(sections: tuple[tuple[str, type], ...]) -> type[RecipeConfig]:
    # Named after their sections and kept in this module, so that a config can be pickled.
    suffix = "".join(f"_{name}" for name, _ in sections)
    algorithm = dataclasses.make_dataclass(
        f"AlgorithmConfig{suffix}", [(name, cls, field(default_factory=cls)) for name, cls in sections],
        bases=(AlgorithmConfig,))
    recipe = dataclasses.make_dataclass(
        f"RecipeConfig{suffix}", [("algorithm", algorithm, field(default_factory=algorithm))], bases=(RecipeConfig,))
    for made in (algorithm, recipe):
        made.__module__ = __name__
        globals()[made.__name__] = made
    return recipe
