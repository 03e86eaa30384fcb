"""The typed recipe schema: one dataclass per component.

A recipe YAML is merged onto `RecipeConfig` (OmegaConf structured config), so an
unknown key or a wrong type is caught before anything runs. Every field's comment
is its documentation; README's recipe reference is generated from the same words.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class PartitionConfig:
    scheme: str = "iid"  # how the training pool is split across clients: iid | dirichlet | shards | natural
    alpha: float = 0.5  # dirichlet: label-skew concentration; smaller is more skewed
    classes_per_client: int = 2  # shards: how many classes each client holds
    min_samples: int = 10  # dirichlet: redraw until every client holds at least this many samples
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
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    labels: LabelsConfig = field(default_factory=LabelsConfig)


@dataclass
class ModelConfig:
    name: str = "fedavg_cnn"  # any timm model name, or one of fedssl's small FL CNNs
    pretrained: bool = False  # load weights from `checkpoint` (never from the network)
    checkpoint: str = ""  # local weights file (.pth/.safetensors) used when pretrained is true
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments for timm.create_model


@dataclass
class TrainConfig:
    optimizer: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.01  # client learning rate
    momentum: float = 0.0  # sgd momentum
    weight_decay: float = 0.0  # L2 penalty of the client optimizer
    batch_size: int = 32  # client mini-batch size
    local_epochs: int = 1  # passes over the client's labeled data per round
    local_steps: int = 0  # if > 0, a fixed number of SGD steps per round instead of epochs
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
class FedMatchConfig:
    lambda_s: float = 10.0  # weight of the labeled loss on sigma
    lambda_iccs: float = 1e-2  # weight of the inter-client consistency (KL to helpers)
    lambda_l1: float = 1e-4  # L1 sparsity of psi (the paper uses 1e-5 with labels at the server)
    lambda_l2: float = 10.0  # L2 tie of psi to the frozen sigma
    tau: float = 0.85  # confidence threshold of agreement-based pseudo-labels
    helpers: int = 2  # H: nearest client models sent as helpers
    helper_every: int = 10  # h: rounds between helper refreshes
    sparsity: float = 1e-5  # delta entries with |value| below this are not sent


@dataclass
class PersonalConfig:
    patterns: list[str] = field(default_factory=list)  # fedper/fedrep/fedbn: fnmatch patterns of the state_dict arrays that stay on the client (default: fedper/fedrep the classifier, fedbn the normalization layers)
    head_epochs: int = 1  # fedrep: epochs training the head (body frozen) before train.local_epochs training the body (head frozen)
    lam: float = 0.1  # ditto: lambda, the pull of each client's personal model toward the global one
    ssl: bool = False  # fedper/fedrep/fedbn/ditto: clients also learn from unlabeled data with FixMatch (algorithm.ssl)


@dataclass
class MetaConfig:
    variant: str = "fo"  # perfedavg: fo (first-order) | hf (Hessian-free, finite-difference Hessian-vector product)
    inner_lr: float = 0.01  # perfedavg: alpha, the inner (adaptation) step size; train.lr is the outer step beta
    hf_delta: float = 0.001  # perfedavg hf: delta of the finite-difference Hessian-vector product
    adapt_steps: int = 1  # perfedavg/reptile: SGD steps on a client's labeled data that adapt the global model before its personal evaluation


@dataclass
class AlgorithmConfig:
    name: str = "fedavg"  # the registered algorithm: fedavg | fedprox | fixmatch | fedmatch | semifl | fedper | fedrep | fedbn | ditto | perfedavg | reptile
    proximal_mu: float = 0.0  # FedProx proximal term weight (mu); 0 disables it
    server_lr: float = 1.0  # server learning rate applied to the averaged update
    server_momentum: float = 0.0  # FedAvgM server momentum (beta); 0 is plain FedAvg
    ssl: SSLConfig = field(default_factory=SSLConfig)
    fedmatch: FedMatchConfig = field(default_factory=FedMatchConfig)
    personal: PersonalConfig = field(default_factory=PersonalConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)


@dataclass
class FlowerConfig:
    num_cpus: float = 1.0  # simulation: CPU cores each client (ClientApp) reserves; fewer clients run at once with more
    num_gpus: float = 0.0  # simulation: GPU share of each client, e.g. 0.25 runs four clients per GPU
    round_timeout: float = 600.0  # seconds the server waits for a round's updates; a client silent by then is dropped
    connect_timeout: float = 120.0  # seconds the server waits for nodes holding every partition to connect


@dataclass
class FederationConfig:
    backend: str = "inprocess"  # where clients run: inprocess (one process) | flower (Flower's simulation engine)
    rounds: int = 10  # communication rounds
    clients: int = 10  # population size
    clients_per_round: int = 10  # clients sampled each round (ignored when client_fraction is set)
    client_fraction: Optional[float] = None  # share of the population sampled each round, in (0, 1]
    eval_every: int = 1  # evaluate the global model every k rounds (and always after the last)
    device: str = "cpu"  # torch device for training: cpu | cuda | auto
    concurrency: str = "auto"  # how a round's clients train: sequential (one after another) | vmap (together, torch.func.vmap over stacked weights; where the algorithm or model cannot, one at a time, logged) | auto (vmap on CUDA, else sequential)
    concurrent_clients: int = 64  # vmap: at most this many clients train at once (bounds device memory)
    states_in_memory: int = 100  # clients whose kept state (personal layers, ...) stays in memory; the rest are spilled to disk
    state_dir: str = ""  # where spilled client states go, one file per client (default: a temporary directory)
    aggregator: str = "mean"  # how FedAvg-family servers combine updates: mean (example-weighted) | median | trimmed_mean | krum | multi_krum
    trim_fraction: float = 0.1  # trimmed_mean: share of the largest and of the smallest values dropped per coordinate (beta)
    byzantine: int = 1  # krum, multi_krum: f, the attackers tolerated; needs clients_per_round >= 2f + 3
    krum_select: int = 0  # multi_krum: m, how many best-scored updates are averaged (0: n - f)
    min_clients: int = 1  # a round needs this many usable updates, else it is retried (round_retries) or the run stops
    round_retries: int = 0  # times a round with too few usable updates is redrawn from the clients that did not fail
    max_update_ratio: float = 1000.0  # an update whose distance from the weights it was sent exceeds this x max(their norm, 1) is dropped and counted (e.g. a rogue x1e30 update)
    flower: FlowerConfig = field(default_factory=FlowerConfig)  # backend=flower: client resources and timeouts


@dataclass
class PrivacyConfig:
    mechanism: str = "none"  # none | central: user-level DP-FedAvg (clipped client deltas, Gaussian noise on their average)
    clip: float = 1.0  # L2 bound on each client's delta (its change to the global arrays); with adaptive_clip, the first bound
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
